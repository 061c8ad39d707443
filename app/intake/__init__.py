"""Taking the webhook in: check the caller and the body, publish the event, answer in milliseconds."""
