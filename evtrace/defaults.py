"""Defaults that more than one place offers (the API, the CLI, the notebook magic), written once."""

#: regions kept in memory (a ring of chunks: older ones are dropped and counted); about 184 MB
MAX_REGIONS = 4_000_000
#: seconds between clock anchors on each GPU's side stream
ANCHOR_INTERVAL_S = 0.1
#: how deep below each top-level module the automatic hooks trace (``instrument()`` traces a
#: model it is given at every depth unless told otherwise)
HOOK_DEPTH = 2
#: the only port ui.perfetto.dev fetches a trace from (its content-security policy)
VIEW_PORT = 9001
