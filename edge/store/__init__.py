"""The store stage: a store-and-forward queue of readings in LMDB, tuned for flash wear.

    block      the block format, byte by byte (pure functions; Window, Batch)
    layout     the LMDB environment: keys, named databases, flags and their flash cost
    queue      the Store: add, commit loop, take / accept / reject / keep, watermarks; its threads
    recovery   opening, damage detection, moving a damaged store aside
    tools      read-only inspect and dump for `edge store`
"""

from edge.store.block import StoreDamaged, StoreUnavailable, decode_block, encode_block
from edge.store.layout import Block
from edge.store.queue import READING_BYTES, Counters, Store, StoreSnapshot
from edge.store.recovery import salvage_read
from edge.store.tools import StoreSummary, dump, inspect

__all__ = ["READING_BYTES", "Block", "Counters", "Store", "StoreDamaged", "StoreSnapshot", "StoreSummary",
           "StoreUnavailable", "decode_block", "dump", "encode_block", "inspect", "salvage_read"]
