"""The global scheduler: registry, global prompt trees, routing policies (pure) and the
asyncio service around them (`memserve scheduler`)."""
