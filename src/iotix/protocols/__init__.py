"""Wire protocols without I/O: state machines fed bytes and drained of bytes."""
