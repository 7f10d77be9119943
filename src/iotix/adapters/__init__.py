"""Protocol adapters: the async shells that put the protocol cores on real sockets."""
