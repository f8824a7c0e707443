"""dlib's face recognition ResNet in torch against dlib itself: descriptor agreement and faces/s.

    python benchmarks/dlib_torch.py [--data ../shared/data/people] [--repeats 3] [--batch 16] [--device cpu]
        [--json results/dlib_torch.json]

Every photo under --data (``<bundle>/<character>/<image>``) where dlib's HOG detector finds a face: dlib's chip
(``get_face_chip``, 150 px) goes through dlib's ``compute_face_descriptor`` and through the torch network; dlib's
full-image path (``compute_face_descriptor(image, shape)``) and the torch network on the differentiable warp
(``cut_face_chips``) are compared too. Reports the worst cosine of each, and the same-vs-different-person ROC AUC
of dlib's and the torch descriptors over all pairs. Speed: the median over --repeats of the chips per second,
dlib (its own batching) vs torch in batches of --batch, recognition only (detection and chips excluded).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dtback.data.images import load_rgb
from dtback.identity.dlib_torch import cut_face_chips, load_dlib_resnet
from dtback.identity.face import DlibFaceEncoder
from dtback.io import write_json

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive pair scores above a random negative one (ties count half)."""
    pos, neg = np.sort(scores[positive]), scores[~positive]
    below = np.searchsorted(pos, neg, side="left")
    above = np.searchsorted(pos, neg, side="right")
    return float(((len(pos) - above) + 0.5 * (above - below)).sum() / (len(pos) * len(neg)))


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def pair_auc(descriptors: np.ndarray, labels: list[str]) -> float:
    upper = np.triu_indices(len(labels), 1)
    same = (np.array(labels)[:, None] == np.array(labels)[None, :])[upper]
    matrix = unit(descriptors)
    return roc_auc((matrix @ matrix.T)[upper], same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[1] / "../shared/data/people")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    encoder, net = DlibFaceEncoder(), load_dlib_resnet().to(args.device)
    files = sorted(p for p in args.data.resolve().glob("*/*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    chips, labels, dlib_chip, dlib_full, warped, no_face = [], [], [], [], [], []
    for path in files:
        image = np.asarray(load_rgb(path, 10**8))
        faces = encoder.detect(image)
        if not faces:
            no_face.append(str(path.relative_to(args.data.resolve())))
            continue
        face = max(faces, key=lambda f: f.area)
        chip = encoder.align(image, face)
        dlib = encoder._dlib
        x1, y1, x2, y2 = (int(round(v)) for v in face.box)
        shape = dlib.full_object_detection(dlib.rectangle(x1, y1, x2 - 1, y2 - 1),
                                           [dlib.point(int(x), int(y)) for x, y in face.landmarks])
        chips.append(chip)
        labels.append(f"{path.parent.parent.name}/{path.parent.name}")
        dlib_chip.append(np.array(encoder._recognizer.compute_face_descriptor(chip)))
        dlib_full.append(np.array(encoder._recognizer.compute_face_descriptor(image, shape)))
        pixels = torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float().to(args.device)
        warped.append(cut_face_chips(pixels, torch.from_numpy(face.landmarks)[None])[0])
    batch = torch.from_numpy(np.stack(chips)).permute(0, 3, 1, 2).float().to(args.device)
    with torch.no_grad():
        ours = torch.cat([net(batch[i:i + args.batch]) for i in range(0, len(batch), args.batch)]).cpu().numpy()
        ours_warped = torch.cat([net(torch.stack(warped[i:i + args.batch]))
                                 for i in range(0, len(warped), args.batch)]).cpu().numpy()
    dlib_chip, dlib_full = np.stack(dlib_chip), np.stack(dlib_full)

    def worst(a: np.ndarray, b: np.ndarray) -> tuple[float, str]:
        cosines = (unit(a) * unit(b)).sum(axis=1)
        return float(cosines.min()), labels[int(cosines.argmin())]

    def rate(run) -> float:
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return len(chips) / statistics.median(times)

    def torch_run() -> None:
        with torch.no_grad():
            for i in range(0, len(batch), args.batch):
                net(batch[i:i + args.batch])
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    result = {
        "photos": len(files), "faces": len(chips), "no_face": no_face,
        "worst_cosine_torch_vs_dlib_same_chip": worst(ours, dlib_chip),
        "worst_cosine_torch_vs_dlib_full_image": worst(ours, dlib_full),
        "worst_cosine_torch_warp_vs_dlib_full_image": worst(ours_warped, dlib_full),
        "max_abs_difference_same_chip": float(np.abs(ours - dlib_chip).max()),
        "auc_dlib": pair_auc(dlib_full, labels), "auc_torch": pair_auc(ours, labels),
        "auc_torch_warp": pair_auc(ours_warped, labels),
        "faces_per_s_dlib": rate(lambda: encoder._recognizer.compute_face_descriptor(chips)),
        "faces_per_s_torch": rate(torch_run), "batch": args.batch, "device": args.device,
        "torch_threads": torch.get_num_threads(), "machine": f"{platform.machine()} {platform.processor()}".strip(),
        "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
