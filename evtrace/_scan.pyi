"""The Chrome JSON reader's scanner (evtrace/_scan.c)."""

def scan(data: bytes, lo: int, hi: int, /) -> tuple[bytes, bytes, bytes, bytes, bytes]:
    """The events of ``data[lo:hi]`` on evtrace's layout: (pieces, host, device, counter_pids,
    names), each bytes of int64 rows (see evtrace/_scan.c)."""
