"""The demo's embedded world: procedural images of coloured shapes with gold boxes and web-style
captions, deterministic by seed, written as the files the real stages read.

An image has 1-5 objects of `KINDS` in `COLOURS`, small or large, solid, striped or dotted,
on a plain, gradient, noisy or striped background; later objects may hide earlier ones.
Gold boxes are tight to each object's drawn mask; an object less than half visible is left out
of the gold (and of the caption). Captions are written from varied templates into web-style
English with junk ("royalty free vector", ids, file names), group repeated objects with a
count ("two blue rings"), sometimes name an absent object and sometimes omit a present one,
so the teacher's pseudo-labels are imperfect in the ways web captions are.

The world is a miniature of GLIP's setting: human gold is narrow, web captions are broad,
evaluation is broad. The gold split (the teacher's data, like COCO/Flickr30k for GLIP-T)
draws and annotates only the `BASE_KINDS`; its category list names only them, as COCO's 80
classes do. The web split is several times larger and holds every kind, the `TAIL_KINDS`
included, named only by its captions (as CC3M/SBU captions name concepts no detection set
annotates). The test split covers every kind, so its AP on the tail kinds measures what the
loop learnt from captions alone (GLIP's LVIS-rare gain, OWL-ST's APr gain).

`write_world(out, size, seed)` writes three splits (`WorldPaths`):
- gold: `gold/images/*.jpg`, `gold/instances.json` (COCO detection, one category per base kind)
  and `gold/grounding.json` (MDETR/GoldG layout: `caption` per image, `tokens_positive` per box);
- web: img2dataset-style shards `web/shards/{00000..}.tar` (`{key}.jpg`, `{key}.txt`,
  `{key}.json`) and, kept aside, `web/web_gold.json` (COCO, image id = int(key)) to measure
  pseudo-label precision/recall;
- test: `test/images/*.jpg` and `test/instances.json`.

The web split also holds `test_copies` copies of test images (`web/test_copies.json` lists
them: key, test image, kind), as web crawls hold copies of benchmark images: resized,
recompressed, cropped by 10% and mirrored ones in turn, each with its test image's caption,
appended to the shards in turn. They are not in `web_gold.json` (their gold is the test
split's); `pipeline decontaminate` is to remove them before pseudo-labelling. They come from
their own random stream, so every other image, caption and box is what the same seed gives
without them.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.demo.drawing import background_canvas, shape_mask, texture_fill

KINDS = ("square", "circle", "triangle", "star", "cross", "ring", "diamond", "hexagon")
BASE_KINDS = KINDS[:4]  # drawn and annotated in the gold split
TAIL_KINDS = KINDS[4:]  # only in the web (named by captions) and test splits
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
TEXTURES = ("solid", "striped", "dotted")
BACKGROUNDS = ("plain", "gradient", "noisy", "striped")
COUNT_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}


@dataclass(frozen=True)
class WorldSize:
    gold: int
    web: int
    web_shards: int
    test: int
    image_side: tuple[int, int] = (128, 160)  # long side drawn from this range (small: fast CPU training)
    object_scale: float = 1.0  # object radii relative to the image's long side / 224
    test_copies: int = 0  # copies of test images hidden in the web shards


SIZES = {
    "small": WorldSize(gold=24, web=32, web_shards=2, test=16, test_copies=4),
    "default": WorldSize(gold=160, web=640, web_shards=8, test=100, test_copies=8),
    "large": WorldSize(gold=640, web=1920, web_shards=16, test=400, test_copies=16),
}


@dataclass(frozen=True)
class WorldPaths:
    root: Path
    gold_images: Path
    gold_coco: Path
    gold_grounding: Path
    web_shards: Path
    web_gold: Path
    test_images: Path
    test_coco: Path
    web_test_copies: Path  # which web samples are copies of test images (not part of the web gold)


@dataclass
class _Object:
    kind: str
    colour: str
    size: str
    texture: str
    box: tuple[float, float, float, float]  # xyxy, tight to the visible mask's extent


def render_image(
    rng: np.random.Generator, side: tuple[int, int], kinds: tuple[str, ...] = KINDS, object_scale: float = 1.0
) -> tuple[Image.Image, list[_Object], str]:
    """One image of objects drawn from `kinds`, its visible objects (gold) and its background kind."""
    long_side = int(rng.integers(side[0], side[1] + 1))
    short_side = int(long_side * rng.uniform(0.65, 1.0))
    size = (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
    background = str(rng.choice(BACKGROUNDS))
    canvas = background_canvas(background, size, rng)
    owner = np.full((size[1], size[0]), -1, dtype=np.int32)
    drawn: list[tuple[str, str, str, str, np.ndarray]] = []
    for index in range(int(rng.integers(1, 6))):
        kind, colour = str(rng.choice(kinds)), str(rng.choice(list(COLOURS)))
        big = rng.random() < 0.5
        scale = long_side / 224 * object_scale  # object radii in proportion to the image
        r = min(float(rng.uniform(26, 40) if big else rng.uniform(14, 22)) * scale, 0.45 * min(size))
        cx, cy = rng.uniform(r, size[0] - r), rng.uniform(r, size[1] - r)
        mask = np.asarray(shape_mask(kind, size, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))) > 127
        texture = str(rng.choice(TEXTURES, p=(0.5, 0.25, 0.25)))
        canvas[mask] = texture_fill(texture, COLOURS[colour], size, rng)[mask]
        owner[mask] = index
        drawn.append((kind, colour, "large" if big else "small", texture, mask))
    objects = []
    for index, (kind, colour, size_word, texture, mask) in enumerate(drawn):
        visible = owner == index
        if visible.sum() < 0.5 * mask.sum():
            continue
        ys, xs = np.nonzero(mask)
        objects.append(_Object(kind, colour, size_word, texture, (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1))))
    return Image.fromarray(canvas.astype(np.uint8)), objects, background


def _plural(kind: str) -> str:
    return kind + "es" if kind.endswith(("s", "x", "sh", "ch")) else kind + "s"


def write_caption(
    objects: list[_Object], background: str, rng: np.random.Generator, kinds: tuple[str, ...] = KINDS
) -> tuple[str, list[tuple[tuple[int, int], list[int]]]]:
    """A web-style caption and its phrases: ((start, end), indices of the objects they name);
    an absent object it sometimes names is one of `kinds`."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, obj in enumerate(objects):
        if rng.random() < 0.12 and len(objects) > 1:
            continue  # a present object the caption does not mention
        groups.setdefault((obj.colour, obj.kind), []).append(index)
    if not groups:  # every object was left out: name the first one
        groups[(objects[0].colour, objects[0].kind)] = [0]
    mentions: list[tuple[str, list[int]]] = []
    for (colour, kind), members in groups.items():
        obj = objects[members[0]]
        if len(members) > 1:
            text = f"{COUNT_WORDS[len(members)]} {colour} {_plural(kind)}"
        else:
            adjectives = [obj.size] if rng.random() < 0.5 else []
            if obj.texture != "solid" and rng.random() < 0.5:
                adjectives.append(obj.texture)
            words = [*adjectives, colour, kind]
            text = " ".join(["an" if words[0][0] in "aeiou" else "a", *words])
        mentions.append((text, members))
    if rng.random() < 0.15:  # an object the caption names but the image does not hold
        colour = str(rng.choice(list(COLOURS)))
        mentions.append((f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {rng.choice(kinds)}", []))
    order = rng.permutation(len(mentions))
    mentions = [mentions[i] for i in order]
    joiners = [" and ", " beside ", " with ", ", ", " next to "]
    spans: list[tuple[tuple[int, int], list[int]]] = []
    prefix = str(rng.choice(["", "", "Stock photo: ", "Image of ", "Illustration: "]))
    caption = prefix
    for position, (text, members) in enumerate(mentions):
        if position:
            caption += str(rng.choice(joiners))
        start = len(caption)
        caption += text
        spans.append(((start, len(caption)), members))
    caption += str(rng.choice([f" on a {background} background", f" over a {background} backdrop", ""]))
    caption += str(rng.choice(["", "", ", royalty free vector", " - stock image", f" #{int(rng.integers(1000, 99999))}", f" IMG_{int(rng.integers(1000, 9999))}.jpg"]))
    if caption[0].islower() and rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:]  # same length: spans unchanged
    return caption, spans


def _categories(kinds: tuple[str, ...] = KINDS) -> list[dict]:
    """COCO categories of `kinds`; ids are positions in `KINDS` + 1 in every split."""
    return [{"id": KINDS.index(kind) + 1, "name": kind, "supercategory": "shape"} for kind in kinds]


def _coco_boxes(objects: list[_Object], image_id: int, next_id: int) -> list[dict]:
    anns = []
    for offset, obj in enumerate(objects):
        x0, y0, x1, y1 = obj.box
        anns.append(
            {"id": next_id + offset, "image_id": image_id, "category_id": KINDS.index(obj.kind) + 1,
             "bbox": [x0, y0, x1 - x0, y1 - y0], "area": (x1 - x0) * (y1 - y0), "iscrowd": 0}
        )
    return anns


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _split(rng: np.random.Generator, count: int, spec: WorldSize, first_id: int, kinds: tuple[str, ...] = KINDS):
    for offset in range(count):
        image, objects, background = render_image(rng, spec.image_side, kinds, spec.object_scale)
        while not objects:
            image, objects, background = render_image(rng, spec.image_side, kinds, spec.object_scale)
        caption, spans = write_caption(objects, background, rng, kinds)
        yield first_id + offset, image, objects, caption, spans


COPY_KINDS = ("resize", "recompress", "crop", "flip")


def copy_of(image: Image.Image, kind: str, rng: np.random.Generator) -> bytes:
    """A web copy of an image, as JPEG: resized (0.5-0.7x or 1.2-1.5x), recompressed (quality
    30-60), cropped to 90% of each side at a random position, or mirrored."""
    width, height = image.size
    if kind == "resize":
        scale = float(rng.uniform(0.5, 0.7) if rng.random() < 0.5 else rng.uniform(1.2, 1.5))
        return _jpeg(image.resize((round(width * scale), round(height * scale)), Image.Resampling.BICUBIC))
    if kind == "recompress":
        return _jpeg(image, quality=int(rng.integers(30, 61)))
    if kind == "crop":
        crop_w, crop_h = round(width * 0.9), round(height * 0.9)
        x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        return _jpeg(image.crop((x, y, x + crop_w, y + crop_h)))
    if kind == "flip":
        return _jpeg(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    raise ValueError(f"unknown copy kind {kind!r}; choose one of {', '.join(COPY_KINDS)}")


def _add_web_sample(tar: tarfile.TarFile, key: str, jpeg: bytes, caption: str) -> None:
    width, height = Image.open(io.BytesIO(jpeg)).size
    meta = {"key": key, "caption": caption, "width": width, "height": height}
    for name, data in ((f"{key}.jpg", jpeg), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())):
        member = tarfile.TarInfo(name)
        member.size, member.mtime, member.mode = len(data), 0, 0o644
        tar.addfile(member, io.BytesIO(data))


def world_paths(root: str | Path) -> WorldPaths:
    """Where `write_world(root, ...)` puts each file."""
    root = Path(root)
    return WorldPaths(
        root=root, gold_images=root / "gold" / "images", gold_coco=root / "gold" / "instances.json",
        gold_grounding=root / "gold" / "grounding.json", web_shards=root / "web" / "shards",
        web_gold=root / "web" / "web_gold.json", test_images=root / "test" / "images", test_coco=root / "test" / "instances.json",
        web_test_copies=root / "web" / "test_copies.json",
    )


def write_world(out: str | Path, size: str = "small", seed: int = 0, *, test_copies: int | None = None) -> WorldPaths:
    """Write the three splits under `out` (see the module doc); same seed, same bytes.
    `test_copies` overrides the size's number of test-image copies in the web split."""
    if size not in SIZES:
        raise ValueError(f"unknown world size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size]
    copies = spec.test_copies if test_copies is None else test_copies
    if not 0 <= copies <= spec.test:
        raise ValueError(f"test_copies must be between 0 and the {spec.test} test images, got {copies}")
    paths = world_paths(out)
    for folder in (paths.gold_images, paths.web_shards, paths.test_images):
        folder.mkdir(parents=True, exist_ok=True)
    rngs = [np.random.default_rng([seed, split]) for split in range(4)]  # gold, web, test, the copies

    _write_gold(paths, spec, rngs[0])
    # test: held out (drawn before the web split is written: its copies go into the web shards)
    test_samples = _write_test(paths, spec, rngs[2])

    # the copies of test images, and the web shard each is appended to
    copied = sorted(int(i) for i in rngs[3].choice(len(test_samples), size=copies, replace=False)) if copies else []
    extra: dict[int, list[tuple[str, bytes, str]]] = {}
    listing = []
    for number, index in enumerate(copied):
        test_id, image, _, caption, _ = test_samples[index]
        kind = COPY_KINDS[number % len(COPY_KINDS)]
        key = f"{spec.web + number + 1:09d}"  # after every web key
        shard = number % spec.web_shards
        extra.setdefault(shard, []).append((key, copy_of(image, kind, rngs[3]), caption))
        listing.append({"key": key, "shard": f"{shard:05d}", "test_image": f"{test_id:06d}.jpg", "kind": kind})

    # web: shards with captions only; the gold kept aside
    images, anns = [], []
    per_shard = math.ceil(spec.web / spec.web_shards)
    samples = list(_split(rngs[1], spec.web, spec, 1))
    for shard in range(spec.web_shards):
        with tarfile.open(paths.web_shards / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for image_id, image, objects, caption, _ in samples[shard * per_shard : (shard + 1) * per_shard]:
                key = f"{image_id:09d}"
                _add_web_sample(tar, key, _jpeg(image), caption)
                images.append({"id": image_id, "file_name": f"{key}.jpg", "width": image.width, "height": image.height})
                anns += _coco_boxes(objects, image_id, len(anns) + 1)
            for key, jpeg, caption in extra.get(shard, []):
                _add_web_sample(tar, key, jpeg, caption)
    _write_json(paths.web_gold, {"images": images, "annotations": anns, "categories": _categories()})
    _write_json(paths.web_test_copies, {"copies": listing})
    return paths


def _write_gold(paths: WorldPaths, spec: WorldSize, rng: np.random.Generator) -> None:
    """The gold split: detection + grounding annotations of the same images, base kinds only."""
    images, anns, g_images, g_anns = [], [], [], []
    for image_id, image, objects, caption, spans in _split(rng, spec.gold, spec, 1, BASE_KINDS):
        name = f"{image_id:06d}.jpg"
        (paths.gold_images / name).write_bytes(_jpeg(image))
        info = {"id": image_id, "file_name": name, "width": image.width, "height": image.height}
        images.append(info)
        anns += _coco_boxes(objects, image_id, len(anns) + 1)
        g_images.append({**info, "caption": caption})
        for (start, end), members in spans:
            for member in members:
                [ann] = _coco_boxes([objects[member]], image_id, len(g_anns) + 1)
                g_anns.append({**ann, "tokens_positive": [[start, end]], "phrase": caption[start:end]})
    _write_json(paths.gold_coco, {"images": images, "annotations": anns, "categories": _categories(BASE_KINDS)})
    _write_json(paths.gold_grounding, {"images": g_images, "annotations": g_anns, "categories": _categories(BASE_KINDS)})


def _write_test(paths: WorldPaths, spec: WorldSize, rng: np.random.Generator) -> list:
    """The held-out test split, every kind; returns its samples (the web split hides copies of some)."""
    test_samples = list(_split(rng, spec.test, spec, 1))
    images, anns = [], []
    for image_id, image, objects, _, _ in test_samples:
        name = f"{image_id:06d}.jpg"
        (paths.test_images / name).write_bytes(_jpeg(image))
        images.append({"id": image_id, "file_name": name, "width": image.width, "height": image.height})
        anns += _coco_boxes(objects, image_id, len(anns) + 1)
    _write_json(paths.test_coco, {"images": images, "annotations": anns, "categories": _categories()})
    return test_samples


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))
