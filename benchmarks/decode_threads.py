"""Seconds to decode an image folder's JPEGs with N threads (the first decode of `dataset=imagefolder`).

    python -m benchmarks.decode_threads DATA_DIR THREADS,... SPLITS      # e.g. /tmp/cifar10-jpeg 2,1,2,1 train,test
"""

import argparse
import os
import time
from pathlib import Path

from cifar_resnet.data.image_folder import decode_images, list_folder


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decode_threads", description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="an image folder (train/ and test/ below it)")
    parser.add_argument("threads", help="thread counts to time in turn, comma-separated (e.g. 2,1,2,1)")
    parser.add_argument("splits", help="the splits decoded each time, comma-separated (e.g. train,test)")
    args = parser.parse_args()
    paths = [path for split in args.splits.split(",") for path, _ in list_folder(args.data_dir / split)[0]]
    print(len(paths), "images", flush=True)
    for threads in (int(count) for count in args.threads.split(",")):
        load = os.getloadavg()[0]
        start = time.perf_counter()
        decode_images(paths, threads)
        seconds = time.perf_counter() - start
        print(f"threads {threads}: {seconds:.2f} s, {len(paths) / seconds:.0f} img/s (load average before: {load:.1f})",
              flush=True)


if __name__ == "__main__":
    main()
