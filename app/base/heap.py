"""What a process loaded at start-up, out of the cyclic garbage collector's reach.

Once its modules, the app, its settings and its clients are loaded, a web process holds about
135,000 objects that live as long as it does. Python's full collections walk every one of them
anyway: some 70 ms, during which every thread of the process waits, about once in 20,000 webhooks
(``python -m bench.gc_pauses`` times them). ``freeze_startup_heap`` moves them to the collector's
permanent generation (``gc.freeze``) once the process is ready, so that a collection walks only
what came after. A worker process does the same.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then freeze every object still alive."""
    gc.collect()
    gc.freeze()
