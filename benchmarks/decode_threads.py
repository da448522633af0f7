"""Seconds to decode an image folder's JPEGs with N threads (the first decode of `dataset=imagefolder`).

    python -m benchmarks.decode_threads DATA_DIR THREADS,... SPLITS      # e.g. /tmp/cifar10-jpeg 2,1,2,1 train,test
"""

import os
import sys
import time
from pathlib import Path

from cifar_resnet.data.image_folder import decode_images, list_folder


def main() -> None:
    root, counts, splits = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    paths = [path for split in splits.split(",") for path, _ in list_folder(root / split)[0]]
    print(len(paths), "images", flush=True)
    for threads in (int(count) for count in counts.split(",")):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        decode_images(paths, threads)
        seconds = time.perf_counter() - start
        print(f"threads {threads}: {seconds:.2f} s, {len(paths) / seconds:.0f} img/s (load average before: {load:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
