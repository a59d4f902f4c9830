"""
The HTTP cache (RFC 9111): a shared cache in memory and on disk, as a stage of the
request pipeline (see L{aproxy.client.stages}). L{aproxy.cache.rules} holds its pure
decisions (what may be stored, how fresh it is, what a request accepts), the store modules
keep the objects, and the stage glues them to the exchanges.
"""
