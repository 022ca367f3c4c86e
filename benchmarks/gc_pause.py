"""How long one full Python collection takes in a process holding what a trial's process imports (torch,
transformers, TRL, PEFT, Ray, datasets, Liger, lora_search's trial path): the pause `fastpath.FROZEN_HEAP_WHY` is about.

    python benchmarks/gc_pause.py        # prints objects tracked and the full collection's milliseconds, three times
"""

from __future__ import annotations

import gc
import json
import time


def main() -> None:
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import ray  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    from lora_search import callbacks, fastpath, train, trainer  # noqa: F401

    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        pass
    rows = []
    for _ in range(3):
        start = time.perf_counter()
        gc.collect()
        rows.append(round((time.perf_counter() - start) * 1e3, 1))
    objects = len(gc.get_objects())
    with fastpath.frozen_heap():
        start = time.perf_counter()
        gc.collect()
        frozen_ms = round((time.perf_counter() - start) * 1e3, 1)
    print(json.dumps({"objects": objects, "full_collection_ms": rows, "frozen_full_collection_ms": frozen_ms}))


if __name__ == "__main__":
    main()
