"""Sans-IO core: JSON-RPC envelope, eras, id and name maps, sealed state. No sockets, no clock."""
