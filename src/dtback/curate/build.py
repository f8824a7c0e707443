"""``dtback dataset build --from SRC ... --out DATA_DIR``: photos and videos -> characters by face clustering.

Steps, each rule documented where it lives:

1. **Read** every source (:mod:`dtback.curate.sources`): folders are walked recursively; files with a video suffix
   are sampled at ``build.video_fps`` (:mod:`dtback.curate.video`); other files are decoded as images by content.
   Each picture's faces are measured once (:mod:`dtback.curate.faces`) and cached by the sha256 of its bytes.
2. **Filter**: no face, too small, blurred, several faces (:func:`~dtback.curate.faces.face_verdict`); the same bytes
   twice; near-duplicates (:func:`~dtback.curate.cluster.near_duplicates`). Pictures are taken in a fixed order:
   those already in the dataset first, then the sources sorted by path and time, so the earlier one is kept.
3. **Group** (:func:`dtback.curate.cluster.group_faces`, sorted by content so that names and order do not matter):
   new faces join existing characters when close enough to all their members, the rest are clustered with complete
   linkage; a group of at least ``data.min_images_per_char`` becomes a new character, smaller groups are skipped as
   ``unclustered``; faces and groups close to the threshold or to two characters are skipped as ``ambiguous``.
   Both are tried again on every run.
4. **Write** ``DATA_DIR/<bundle>/<character>/``: the images (photos copied byte for byte, frames as JPEG),
   ``character.json`` and ``contact_sheet.png`` (:mod:`dtback.curate.characters`); new characters fill bundles
   ``<bundle_prefix>_000, _001, ...`` of ``data.max_chars_per_bundle`` characters (one bundle when null).

**Idempotent and resumable.** Existing characters are never split, merged, renamed or rewritten unless they gain
images; a rerun with the same sources and settings writes the same bytes (``build_report.json`` holds only what the
sources and settings decide). The state lives in ``DATA_DIR/.dtback-build/`` (``state.json``: what each source
gave; ``cache/``: face records, unless ``identity.cache_dir`` is set; ``frames/``: frames with a face).
``character.json`` is written before its images, so an interrupted run leaves listed-but-missing images, which the
next run copies again.
"""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dtback.config import DataConfig, IdentityConfig
from dtback.curate.build_report import BuildReport
from dtback.curate.characters import (
    CHARACTER_FILE,
    Character,
    PlacedImage,
    clip_box,
    copy_atomic,
    draw_sheet,
    file_name,
    new_slots,
    read_characters,
    write_atomic,
    write_character,
    write_contact_sheet,
)
from dtback.curate.build_state import (
    REPORT_FILE,
    STATE_FILE,
    changed_settings_message,
    load_state,
    remove_built_characters,
    save_state,
)
from dtback.curate.corrections import (
    CORRECTIONS_FILE,
    append_correction,
    apply_corrections,
    corrected_names,
    read_corrections,
    split_targets,
)
from dtback.curate.cluster import DEFAULT_THRESHOLDS, group_faces, join_only, near_duplicates
from dtback.curate.faces import FaceRecord, face_verdict, measure, turn_upright
from dtback.data.images import ImageSkip, load_rgb
from dtback.data.layout import AMBIGUOUS_SHEET, BUILD_STATE_DIR
from dtback.curate.sources import Item, SourceReader, SourceSkip, list_files
from dtback.errors import ConfigError, DatasetError
from dtback.identity.crops import BodyCropRule, person_box
from dtback.identity.cache import EmbeddingCache, content_hash
from dtback.identity.face import FaceEncoder

log = logging.getLogger(__name__)

Member = tuple[Item, FaceRecord]  # a picture and its face, on its way into a character
MEASURE_VERSION = "8"  # bump when FaceRecord's measurements change, so old cache entries are not reused


def build_dataset(
    sources: list[Path],
    data: DataConfig,
    identity: IdentityConfig,
    encoder: FaceEncoder,
    progress: bool = True,
    rebuild: bool = False,
) -> BuildReport:
    """Build or extend ``data.data_dir`` from ``sources`` (files or folders) with the face ``encoder`` of
    ``identity.face_backend`` (a photo backend: :func:`dtback.backends.builder_identity` chooses it); returns the
    report (also written to ``DATA_DIR/build_report.json``). A dataset built with other settings is refused, or
    with ``rebuild`` its characters are removed and every source grouped again."""
    return DatasetBuilder(data, identity, encoder, progress).run(sources, rebuild)


def check_usable(report: BuildReport) -> None:
    """Raise :class:`DatasetError` when the dataset has no character after the build, saying why."""
    if report.characters:
        return
    reasons = ", ".join(f"{reason} {count}" for reason, count in report.skipped_by_reason.items()) or "none"
    raise DatasetError(
        f"nothing usable in {', '.join(report.sources)}: {report.read.files} files, {report.items} pictures, "
        f"{report.faces_found} with a face, no group of min_images_per_char={report.settings['min_images_per_char']} "
        f"faces of one person (skipped: {reasons}); see {Path(report.data_dir) / REPORT_FILE}"
    )


class DatasetBuilder:
    """One build of ``data.data_dir``: reads sources, selects and groups faces, writes characters."""

    def __init__(self, data: DataConfig, identity: IdentityConfig, encoder: FaceEncoder, progress: bool = True):
        self.root = Path(data.data_dir)
        self.data = data
        self.cfg = data.build
        self.progress = progress
        self.state_dir = self.root / BUILD_STATE_DIR
        if identity.face_backend not in DEFAULT_THRESHOLDS:
            raise ConfigError(f"identity.face_backend={identity.face_backend}: the dataset builder needs a photo face "
                              f"backend ({', '.join(DEFAULT_THRESHOLDS)}); set data.build.face_backend")
        cluster_default, margin_default, duplicate_default = DEFAULT_THRESHOLDS[identity.face_backend]
        self.threshold = self.cfg.cluster_threshold if self.cfg.cluster_threshold is not None else cluster_default
        self.margin = self.cfg.cluster_margin if self.cfg.cluster_margin is not None else margin_default
        dup = self.cfg.duplicate_face_distance
        self.duplicate_distance = dup if dup is not None else duplicate_default
        self.body_rule = BodyCropRule.from_config(identity)
        self.cache_root = identity.cache_dir or self.state_dir / "cache"
        self.encoder = encoder

    # ------------------------------------------------------------------------------------------------- the run

    def run(self, sources: list[Path], rebuild: bool = False) -> BuildReport:
        start = time.perf_counter()
        if self.root.exists() and not self.root.is_dir():
            raise DatasetError(f"--out {self.root} exists and is not a folder")
        files, skips = list_files(sources, exclude=self.root)  # before --out is made: a missing source leaves nothing
        self.root.mkdir(parents=True, exist_ok=True)
        state_path = self.state_dir / STATE_FILE
        state = load_state(state_path)
        shaping = self.shaping_settings()
        remembered = state.get("settings")
        if remembered is not None and remembered != shaping:
            if not rebuild:
                raise DatasetError(changed_settings_message(self.root, remembered, shaping))
            removed = remove_built_characters(self.root, read_characters(self.root))
            state["placed"] = []  # removed on purpose, not by hand
            log.info("--rebuild: removed %d characters built with other settings", removed)
        state["settings"] = shaping
        characters = read_characters(self.root)
        report = BuildReport(
            data_dir=str(self.root.resolve()), sources=[str(Path(s).resolve()) for s in sources],
            settings=self._settings(),
        )
        report.skips.extend(skips)
        settings = {**self.encoder.settings(), "measure": MEASURE_VERSION, "upscale": self.cfg.upscale_small_faces}
        with EmbeddingCache(self.cache_root / "build", self.encoder.encoder_id, settings) as cache:
            self.cache = cache
            reader = SourceReader(
                self.encoder, cache, self.state_dir / "frames", self.cfg, self.data.max_image_pixels,
                state["sources"], self.progress,
            )
            items = self._read_all(files, reader, report, state, state_path)
            cache.flush()
            self._heal(characters, report, state)
            entries = read_corrections(self.root)
            known = {item.key for item in items}
            self.excluded = apply_corrections(self.root, entries, known, self.cfg.contact_sheet_tiles).excluded
            self.excluded |= self._removed_by_hand(state, known)
            characters = read_characters(self.root)
            placed = {image.embedding_id for character in characters for image in character.images}
            self.pinned = {k: v for k, v in split_targets(self.root, entries, known).items() if k not in placed}
            self.pinned_members: dict[str, list[Member]] = {}
            self.reserved = corrected_names(entries)
            self.ambiguous: list[Member] = []
            joined, new_groups = self._select(items, characters, reader, report)
            self._write(characters, joined, new_groups, report, state, state_path)
            apply_corrections(self.root, entries, known, self.cfg.contact_sheet_tiles)  # characters made just now
            self._write_ambiguous_sheet()
        characters = read_characters(self.root)
        state["placed"] = sorted({image.embedding_id for character in characters for image in character.images})
        save_state(state, state_path)
        report.read = reader.counts
        report.characters = len(characters)
        report.bundles = sorted({c.bundle for c in characters})
        report.seconds = round(time.perf_counter() - start, 2)
        report.write(self.root / REPORT_FILE, run=False)
        return report

    def shaping_settings(self) -> dict[str, Any]:
        """Every setting that shapes the dataset, by config key, with the defaults resolved: remembered in the build
        state so that a rerun with other settings is refused (or, with ``rebuild``, applied from scratch)."""
        build = {f"data.build.{name}": value for name, value in self.cfg.model_dump(mode="json").items()}
        build.update({
            "data.build.cluster_threshold": self.threshold,
            "data.build.cluster_margin": self.margin,
            "data.build.duplicate_face_distance": self.duplicate_distance,
            "data.min_images_per_char": self.data.min_images_per_char,
            "data.max_chars_per_bundle": self.data.max_chars_per_bundle,
            "data.max_image_pixels": self.data.max_image_pixels,
            "face encoder": self.encoder.encoder_id,
            **{f"identity.face_{name}": value for name, value in self.encoder.settings().items()},
            "identity.body_width_factor": self.body_rule.width_factor,
            "identity.body_height_factor": self.body_rule.height_factor,
            "identity.body_top_factor": self.body_rule.top_factor,
        })
        return dict(sorted(build.items()))

    def _settings(self) -> dict[str, Any]:
        return {
            **self.cfg.model_dump(mode="json"),
            "cluster_threshold_used": self.threshold,
            "cluster_margin_used": self.margin,
            "duplicate_face_distance_used": self.duplicate_distance,
            "min_images_per_char": self.data.min_images_per_char,
            "max_chars_per_bundle": self.data.max_chars_per_bundle,
            "face_encoder": self.encoder.encoder_id,
            "face_settings": self.encoder.settings(),
        }

    def _read_all(
        self, files: list[Path], reader: SourceReader, report: BuildReport, state: dict[str, Any], state_path: Path
    ) -> list[Item]:
        items: list[Item] = []
        try:
            for path in tqdm(files, desc="reading sources", unit="file", disable=not self.progress):
                got, skipped = reader.read(path)
                items.extend(got)
                report.skips.extend(skipped)
        finally:
            save_state(state, state_path)  # what was read so far is not read again after an interruption
        return items

    # ------------------------------------------------------------------------------------------- selection

    def _select(
        self, items: list[Item], characters: list[Character], reader: SourceReader, report: BuildReport
    ) -> tuple[dict[int, list[Member]], list[list[Member]]]:
        """Filter, de-duplicate and group ``items``. Returns (new members per existing character index,
        groups of items that become new characters)."""
        placed = {image.embedding_id for character in characters for image in character.images}
        seen: dict[str, str] = {}
        candidates: list[Member] = []
        for item in items:
            record = reader.record(item.key)
            report.items += 1
            report.faces_found += bool(record.num_faces)
            if item.key in seen:
                report.skips.append(SourceSkip(item.label, "same_content", f"the same bytes as {seen[item.key]}"))
                continue
            seen[item.key] = item.label
            if item.key in placed:
                report.already_in_dataset += 1
                continue
            if item.key in self.excluded:
                report.skips.append(SourceSkip(item.label, "excluded", f"excluded in {CORRECTIONS_FILE}"))
                continue
            if item.key in self.pinned and record.num_faces:  # placed by a person: no filter, no grouping
                self.pinned_members.setdefault(self.pinned[item.key], []).append((item, record))
                continue
            verdict = face_verdict(record, self.cfg)
            if verdict is not None and verdict[0] == "face_too_small" and self._joins_only(record):
                verdict = face_verdict(record, self.cfg.model_copy(update={"min_face_size": self.cfg.min_join_face_size}))
            if verdict is not None:
                report.skips.append(SourceSkip(item.label, *verdict))
                continue
            candidates.append((item, record))

        fixed = [(c, image, self._placed_record(c, image)) for c in characters for image in c.images]
        # The larger face of near-duplicates is kept, ties by content: the same set of pictures gives the same
        # choice whatever their names or the order of the sources.
        candidates.sort(key=lambda m: (-_face_area(m[1]), m[0].key))
        records = [r for _, _, r in fixed] + [r for _, r in candidates]
        if not records:
            return {}, []
        duplicate_of = near_duplicates(
            np.stack([r.embedding for r in records]),
            np.stack([r.face_patch for r in records]),
            self.duplicate_distance,
            self.cfg.duplicate_face_correlation,
            fixed=len(fixed),
        )
        labels = [Item(image.embedding_id, image.source, image.frame_time).label for _, image, _ in fixed]
        labels += [item.label for item, _ in candidates]
        kept = []
        for offset, (item, record) in enumerate(candidates):
            original = duplicate_of[len(fixed) + offset]
            if original >= 0:
                report.skips.append(SourceSkip(item.label, "duplicate", f"near-duplicate of {labels[original]}"))
            else:
                kept.append((item, record))
        kept.sort(key=lambda m: m[0].key)
        return self._group(kept, characters, fixed, report)

    def _group(
        self,
        kept: list[Member],
        characters: list[Character],
        fixed: list[tuple[Character, PlacedImage, FaceRecord]],
        report: BuildReport,
    ) -> tuple[dict[int, list[Member]], list[list[Member]]]:
        """Place ``kept`` faces (sorted by content key) by :func:`~dtback.curate.cluster.group_faces`: join
        existing characters, form new ones, or leave them out as ``ambiguous`` / ``unclustered`` skips."""
        # Small faces (full-body photos) never shape a character: they are left out of its members here and only
        # join, at a stricter distance, after the others are placed. Photos a person placed (split --into) are
        # members from the start, so the next run sees the same characters.
        small = [member for member in kept if self._joins_only(member[1])]
        kept = [member for member in kept if not self._joins_only(member[1])]
        pinned = self.pinned_members
        records = [r for *_, r in fixed] + [r for _, r in kept + small] + [r for m in pinned.values() for _, r in m]
        if not records:
            return {}, []
        dimension = records[0].embedding.shape[0]
        existing = {character.key for character in characters}
        named = sorted(key for key in pinned if key not in existing)  # new characters a person named

        def regular(found: list[FaceRecord]) -> np.ndarray:
            return np.array([r.embedding for r in found if not self._joins_only(r)]).reshape(-1, dimension)

        members = [
            regular([r for c, _, r in fixed if c is character] + [r for _, r in pinned.get(character.key, [])])
            for character in characters
        ] + [regular([r for _, r in pinned[key]]) for key in named]
        if not kept and not small:
            return {}, []
        offset = len(characters) + len(named)
        future = new_slots(
            self.root, characters, len(kept) // self.data.min_images_per_char + 1, self.cfg.bundle_prefix,
            self.cfg.character_prefix, self.data.max_chars_per_bundle, self.reserved | set(named),
        )
        names = [c.key for c in characters] + named + [f"{bundle}/{name}" for bundle, name in future]
        embeddings = np.stack([r.embedding for _, r in kept]) if kept else np.zeros((0, dimension))
        grouping = group_faces(
            members, embeddings, self.threshold, self.margin, self.data.min_images_per_char, self.cfg.cluster_linkage,
            names=names,
        )
        joined: dict[int, list[Member]] = {}
        groups: list[list[Member]] = [[] for _ in range(grouping.new_groups)]

        def place(member: Member, k: int) -> None:
            if k < len(characters):
                joined.setdefault(k, []).append(member)
            elif k < offset:
                pinned[named[k - len(characters)]].append(member)
            else:
                groups[k - offset].append(member)

        for index, member in enumerate(kept):
            target = int(grouping.target[index])
            if target >= 0:
                place(member, target)
                continue
            report.skips.append(SourceSkip(member[0].label, grouping.reason[index], grouping.detail[index]))
            if grouping.reason[index] == "ambiguous":
                self.ambiguous.append(member)
        if small:
            final = members + [np.stack([r.embedding for _, r in group]) for group in groups]
            target, detail = join_only(
                final, np.stack([r.embedding for _, r in small]), self.threshold, self.margin, self.cfg.cluster_linkage,
                names,
            )
            for index, member in enumerate(small):
                if target[index] >= 0:
                    place(member, int(target[index]))
                    continue
                verdict = face_verdict(member[1], self.cfg)
                report.skips.append(SourceSkip(member[0].label, verdict[0], f"{verdict[1]}; {detail[index]}"))
        return joined, groups

    def _write_ambiguous_sheet(self) -> None:
        """``DATA_DIR/ambiguous.png``: the photos left out as ``ambiguous``, captioned with their file names, for a
        person to place by hand (``dtback dataset fix``); removed when there are none."""
        path = self.root / AMBIGUOUS_SHEET
        images = []
        for item, record in self.ambiguous:
            pixels = self._pixels_path(item.key, item.source, item.time)
            if pixels.is_file():
                images.append(self._placed(item, record, file=str(pixels)))
        if not images:
            path.unlink(missing_ok=True)
            return
        data = draw_sheet(self.root, images, self.cfg.contact_sheet_tiles)
        if not (path.is_file() and path.read_bytes() == data):
            write_atomic(path, data)

    def _removed_by_hand(self, state: dict[str, Any], known: set[str]) -> set[str]:
        """Pictures placed by an earlier run that are in no character now and not excluded by a correction: a
        character folder (or its ``character.json`` entry) was deleted by hand. Recorded as exclusions in
        ``corrections.yaml`` so they are not placed again; returns their content ids."""
        now = {image.embedding_id for character in read_characters(self.root) for image in character.images}
        gone = sorted(set(state.get("placed", [])) - now - self.excluded)
        for content_id in gone:
            sources = sorted({s for s, entry in state["sources"].items() for i in entry["items"] if i["key"] == content_id})
            append_correction(self.root, {
                "exclude": {"id": content_id, "file": sources[0] if sources else content_id},
                "note": "deleted by hand (its character folder or character.json entry is gone)",
            })
        if gone:
            log.warning("%d placed pictures were deleted by hand; recorded as excluded in %s", len(gone),
                        CORRECTIONS_FILE)
        return set(gone)

    def _joins_only(self, record: FaceRecord) -> bool:
        """A face smaller than ``min_face_size`` but at least ``min_join_face_size``: it may join a character
        (the 20-30 px faces of full-body photos), never start or shape one."""
        width, height = record.box[2] - record.box[0], record.box[3] - record.box[1]
        return self.cfg.min_join_face_size <= min(width, height) < self.cfg.min_face_size

    def _placed_record(self, character: Character, image: PlacedImage) -> FaceRecord:
        """The face record of an image already in the dataset: from the cache, else measured from the file itself
        (after the cache was deleted or the face encoder changed)."""
        entry = self.cache.get(image.embedding_id)
        if entry is not None:
            return FaceRecord.from_tensors(entry)
        path = character.folder(self.root) / image.file
        try:
            pixels = np.asarray(load_rgb(path, self.data.max_image_pixels))
        except ImageSkip as skip:
            listed = f"{path}: listed in {character.key}/{CHARACTER_FILE}"
            raise DatasetError(f"{listed} but {skip.reason.value}: {skip.detail}") from None
        record = measure(self.encoder, pixels, self.cfg.upscale_small_faces)
        if record.num_faces == 0:
            raise DatasetError(
                f"{path}: listed in {character.key}/{CHARACTER_FILE} but {self.encoder.encoder_id} finds no face in it"
            )
        self.cache.put(image.embedding_id, record.to_tensors())
        return record

    # ---------------------------------------------------------------------------------------------- writing

    def _write(
        self,
        characters: list[Character],
        joined: dict[int, list[Member]],
        groups: list[list[Member]],
        report: BuildReport,
        state: dict[str, Any],
        state_path: Path,
    ) -> None:
        """Add the joined members to their characters and make one character per group; write what changed. The
        characters being written are noted in the state first, so that an image missing afterwards is known to be
        an interrupted write (copied again) rather than a deletion by hand (an exclusion)."""
        existing = {character.key for character in characters}
        named_keys = {key for key in self.pinned_members if key not in existing}
        slots = new_slots(
            self.root, characters, len(groups), self.cfg.bundle_prefix, self.cfg.character_prefix,
            self.data.max_chars_per_bundle, self.reserved | named_keys,
        )
        encoder = {"id": self.encoder.encoder_id, "cache_namespace": self.cache.namespace}
        joined = {i: list(members) for i, members in joined.items()}
        named: dict[str, list[Member]] = {}
        by_key = {character.key: i for i, character in enumerate(characters)}
        for key, members in sorted(self.pinned_members.items()):  # split ... --into: a person's choice
            if key in by_key:
                joined.setdefault(by_key[key], []).extend(members)
            else:
                named[key] = members
        work = [(characters[i], members, False) for i, members in sorted(joined.items())]
        work += [(Character(bundle, name, encoder), group, True) for (bundle, name), group in zip(slots, groups)]
        work += [(Character(*key.split("/"), encoder), members, True) for key, members in named.items()]
        if work:
            state["writing"] = sorted(character.key for character, _, _ in work)
            save_state(state, state_path)
        for character, members, is_new in tqdm(work, desc="writing characters", unit="char", disable=not self.progress):
            added = self._add_images(character, members, report)
            if not added:
                continue
            character.encoder = encoder
            write_character(self.root, character)
            for image in added:
                self._copy_in(image, character)
            write_contact_sheet(self.root, character, self.cfg.contact_sheet_tiles)
            report.images_added += len(added)
            if is_new:
                report.new_characters.append(character.key)
            else:
                report.joined_existing += len(added)
                report.grown_characters.append(character.key)
        state.pop("writing", None)

    def _add_images(self, character: Character, members: list[Member], report: BuildReport) -> list[PlacedImage]:
        added = []
        for item, record in members:
            pixels = self._pixels_path(item.key, item.source, item.time)
            if not pixels.is_file():
                report.skips.append(SourceSkip(item.label, "source_missing", f"{pixels} is gone"))
                continue
            image = self._placed(item, record, file_name(item.source, item.time, item.key, pixels, record.rotation))
            character.images.append(image)
            added.append(image)
        return added

    def _placed(self, item: Item, record: FaceRecord, file: str) -> PlacedImage:
        return PlacedImage(
            file=file,
            embedding_id=item.key,
            source=item.source,
            frame_time=item.time,
            face_box=clip_box(record.box, record.size),
            body_box=list(person_box(record.size, record.box, self.body_rule)),
            face_score=round(record.score, 4),
            num_faces=record.num_faces,
            sharpness=round(record.sharpness, 2),
            rotation=record.rotation,
        )

    def _pixels_path(self, key: str, source: str, frame_time: float | None) -> Path:
        return Path(source) if frame_time is None else self.state_dir / "frames" / f"{key}.jpg"

    def _copy_in(self, image: PlacedImage, character: Character) -> None:
        """The picture's bytes, or, for one turned upright to find its face, the turned picture as PNG (lossless):
        its face box and everything read from the dataset afterwards are upright."""
        source = self._pixels_path(image.embedding_id, image.source, image.frame_time)
        if image.rotation:
            try:
                picture = turn_upright(load_rgb(source, self.data.max_image_pixels), image.rotation)
            except ImageSkip as skip:
                raise DatasetError(f"{source}: read for {character.key}/{image.file} but {skip.reason.value}: "
                                   f"{skip.detail}; it changed during the build, run it again") from None
            buffer = io.BytesIO()
            picture.save(buffer, format="PNG")
            write_atomic(character.folder(self.root) / image.file, buffer.getvalue())
            return
        copy_atomic(source, character.folder(self.root) / image.file, link=image.frame_time is not None)

    def _heal(self, characters: list[Character], report: BuildReport, state: dict[str, Any]) -> None:
        """Images listed in a ``character.json`` but missing: copied again when the run that wrote them was
        interrupted (the state still lists the character as being written); otherwise deleted by hand, which is
        recorded as an exclusion in ``corrections.yaml``. Entries whose source is gone are dropped with a
        ``source_missing`` skip."""
        interrupted = set(state.get("writing", []))
        for character in characters:
            missing = [image for image in character.images if not (character.folder(self.root) / image.file).is_file()]
            if not missing:
                continue
            for image in missing:
                source = self._pixels_path(image.embedding_id, image.source, image.frame_time)
                if character.key not in interrupted:
                    append_correction(self.root, {
                        "exclude": {"id": image.embedding_id, "file": f"{character.key}/{image.file}"},
                        "note": "deleted by hand",
                    })
                    character.images.remove(image)
                    log.warning("%s: %s was deleted by hand; recorded as excluded in %s", character.key, image.file,
                                CORRECTIONS_FILE)
                    continue
                if source.is_file() and content_hash(source) == image.embedding_id:
                    self._copy_in(image, character)
                    log.info("%s: copied %s again (missing after an interrupted run)", character.key, image.file)
                    continue
                character.images.remove(image)
                detail = f"{character.key}/{image.file} was missing and its source is gone or changed"
                report.skips.append(SourceSkip(image.source, "source_missing", detail))
            if character.images:
                write_character(self.root, character)
                write_contact_sheet(self.root, character, self.cfg.contact_sheet_tiles)
            else:
                remove_built_characters(self.root, [character], report_too=False)
        state.pop("writing", None)


def _face_area(record: FaceRecord) -> float:
    x1, y1, x2, y2 = (float(v) for v in record.box)
    return (x2 - x1) * (y2 - y1)
