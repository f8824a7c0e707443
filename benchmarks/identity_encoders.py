"""Identity encoder throughput on CPU/GPU: faces/s per face backend, body crops/s, and a fully cached second pass.

    python benchmarks/identity_encoders.py [--data ../shared/data/people/krasserm_lfw] [--repeats 3]
        [--insightface-dir models/antelopev2] [--cnn-images 20]

Face backends: dlib HOG (default) and dlib CNN on the photos in --data; insightface only when a real pack folder is
given (no weights can be downloaded here). The body encoder uses the DINOv2-small architecture (from its config,
random weights: the cost is the same as the real checkpoint's). The cached pass runs `IdentityPrecomputer` twice
over the same images in one run; the second pass makes no encoder call.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from dtback import backends
from dtback.config import DataConfig, IdentityConfig
from dtback.data.images import load_rgb
from dtback.data.layout import scan_dataset
from dtback.identity.body import BodyEncoder
from dtback.identity.face import DlibFaceEncoder, FaceEncoder
from dtback.identity.insightface import InsightFaceEncoder
from dtback.identity.precompute import IdentityPrecomputer

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "people" / "krasserm_lfw"


def time_faces(encoder: FaceEncoder, images: list[np.ndarray], repeats: int) -> tuple[float, int]:
    """Median seconds for detect+align+embed over ``images`` and how many faces were found."""
    times, found = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        found = sum(encoder.encode(image) is not None for image in images)
        times.append(time.perf_counter() - start)
    return statistics.median(times), found


def save_dinov2_small_random(folder: Path) -> Path:
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of <character>/<image> photos")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cnn-images", type=int, default=20, help="images for the (slow) dlib CNN detector")
    parser.add_argument("--insightface-dir", type=Path)
    args = parser.parse_args()

    files = sorted(p for p in args.data.glob("*/*") if p.is_file())
    images = [np.asarray(load_rgb(p, 10**8)) for p in files]
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; data: {args.data} ({len(images)} images, "
          f"{images[0].shape[1]}x{images[0].shape[0]} px)")

    encoders: list[tuple[str, FaceEncoder, list[np.ndarray]]] = [
        ("dlib hog (upsample 1)", DlibFaceEncoder("hog", upsample=1), images),
        ("dlib cnn (upsample 0)", DlibFaceEncoder("cnn", upsample=0), images[: args.cnn_images]),
    ]
    if args.insightface_dir:
        encoders.append(("insightface", InsightFaceEncoder(args.insightface_dir), images))
    for name, encoder, subset in encoders:
        seconds, found = time_faces(encoder, subset, args.repeats)
        print(f"face {name}: {len(subset)} images, {found} faces, median {seconds:.2f} s, {len(subset) / seconds:.1f} faces/s")

    with tempfile.TemporaryDirectory() as tmp:
        body_dir = save_dinov2_small_random(Path(tmp) / "dinov2-small-random")
        body = BodyEncoder.from_pretrained(body_dir)
        pil = [load_rgb(p, 10**8) for p in files]
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for image in pil:
                body.encode(image, None)
            times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        print(f"body dinov2-small (random weights, 224 px): {len(pil)} crops, median {seconds:.2f} s, {len(pil) / seconds:.1f} crops/s")

        data = DataConfig(data_dir=args.data.parent, min_images_per_char=2)
        index = scan_dataset(data, seed=0, progress=False)
        index.characters = [c for c in index.characters if c.bundle == args.data.name]
        identity = IdentityConfig(face_backend="dlib", body_model=str(body_dir), device="cpu")
        cache = Path(tmp) / "cache"
        encoders = backends.face_encoder(identity), backends.body_encoder(identity)
        first = IdentityPrecomputer(*encoders, cache, data.max_image_pixels).run(index, progress=False)
        second = IdentityPrecomputer(*encoders, cache, data.max_image_pixels).run(index, progress=False)
        print(f"precompute (dlib hog + dinov2-small): first pass {first.images} images {first.seconds:.2f} s "
              f"({first.images_per_second:.1f} img/s, {first.face_encoder_calls}+{first.body_encoder_calls} encoder calls); "
              f"cached second pass {second.seconds:.3f} s ({second.images_per_second:.0f} img/s, "
              f"{second.face_encoder_calls}+{second.body_encoder_calls} encoder calls), x{first.seconds / second.seconds:.0f} faster")


if __name__ == "__main__":
    main()
