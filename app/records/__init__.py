"""The stored recordings: the tables, a recording's JSON view, and the change feed's positions."""
