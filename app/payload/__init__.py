"""What a callback is: Africa's Talking's vocabulary, the payload's declaration and its checks, the
envelope a task carries, and the OpenAPI document generated from the declarations."""
