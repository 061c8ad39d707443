"""What a process loaded at start-up, out of the cyclic garbage collector's reach.

Once its modules, the app, its settings and its clients are loaded, a web or worker process holds
some 100,000 objects that live as long as it does. Python's full collections walk every one of
them anyway: a pause of tens of milliseconds every few thousand requests or events, in the middle
of whatever the process was doing (``python -m bench.ack_cpu`` and ``bench.worker_floor`` measure
the difference). ``freeze_startup_heap`` moves them to the collector's permanent generation
(``gc.freeze``) once the process is ready, so that a collection walks only what came after.
"""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then freeze every object still alive."""
    gc.collect()
    gc.freeze()
