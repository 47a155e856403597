"""`memserve up`: one machine's cluster (scheduler, MemPool daemons, workers, gateway)."""
