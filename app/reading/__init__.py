"""Reading: the recordings API and the change feed's endpoint."""
