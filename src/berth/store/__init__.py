"""Config and service discovery: a Consul HTTP API subset on SQLite, and its client."""
