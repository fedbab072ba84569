"""What makes two runs' summaries the same kind: :class:`RunSettings`, kept in ``run.json``.

A folder holds the summaries of one set of generation settings: model, policy, budget,
max-new-tokens, instruction and chat template. The job records them in ``run.json`` before it
writes anything else; a later run into the same folder resumes only under the same settings
(otherwise its "already done" ids would be another configuration's summaries) and refuses,
naming each difference, unless it is told to start over (``--overwrite``).
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

SETTINGS_KEY = "settings"  # where run.json holds them
LEGACY_FIELDS = ("policy", "budget", "max_new_tokens", "instruction")  # what an older run.json's options tell


@dataclass(frozen=True)
class RunSettings:
    """The generation settings of a run (see module docstring).

    model: the model folder's name (for people); model_fingerprint: what identifies it (its
    config.json and the names and sizes of its files, so the same model unpacked elsewhere, as
    under ``ray job submit``, is the same). budget: None under the full cache (it has none).
    chat_template_sha256: of the tokenizer's chat template ("" when it has none).
    """

    model: str
    model_fingerprint: str
    policy: str
    budget: int | None
    max_new_tokens: int
    instruction: str
    chat_template_sha256: str

    def __post_init__(self) -> None:
        for name in ("model", "model_fingerprint", "policy", "instruction", "chat_template_sha256"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"RunSettings.{name}={getattr(self, name)!r}: must be a str")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise ValueError(f"RunSettings.max_new_tokens={self.max_new_tokens!r}: must be a positive int")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int)):
            raise ValueError(f"RunSettings.budget={self.budget!r}: must be an int or None")

    @classmethod
    def of_job(cls, model_folder: Path, tokenizer, policy: str, budget: int, max_new_tokens: int, instruction: str) -> "RunSettings":
        """The settings of a job on ``model_folder`` (with its ``tokenizer``)."""
        template = getattr(tokenizer, "chat_template", None) or ""
        if not isinstance(template, str):  # a dict of named templates
            template = repr(sorted(template.items()))
        return cls(model=Path(model_folder).name, model_fingerprint=model_fingerprint(model_folder), policy=policy,
                   budget=None if policy == "full" else budget, max_new_tokens=max_new_tokens, instruction=instruction,
                   chat_template_sha256=_sha256(template.encode()) if template else "")

    def to_dict(self) -> dict:
        return asdict(self)

    def differences(self, recorded: dict, fields: tuple[str, ...] | None = None) -> list[str]:
        """One line per setting that differs from ``recorded`` (a folder's run.json settings):
        ``name: folder's value -> this run's value``; only ``fields`` when given."""
        out = []
        for name, value in self.to_dict().items():
            if name == "model" or (fields is not None and name not in fields) or recorded.get(name) == value:
                continue
            if name == "model_fingerprint":
                out.append(f"model: {recorded.get('model')} ({recorded.get(name)}) -> {self.model} ({value})")
            else:
                out.append(f"{name}: {_short(recorded.get(name, '(not recorded)'))} -> {_short(value)}")
        return out


def legacy_settings(options: dict) -> dict:
    """The :data:`LEGACY_FIELDS` of the run.json ``options`` an older version of the job wrote
    (it recorded no model fingerprint or chat template)."""
    policy = options.get("policy")
    return {"policy": policy, "budget": None if policy == "full" else options.get("budget"),
            "max_new_tokens": options.get("max_new_tokens"), "instruction": options.get("instruction")}


def model_fingerprint(folder: Path) -> str:
    """sha256 (16 hex digits) of the folder's config.json and the names and sizes of its files."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f"{f.name}:{f.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _short(value, limit: int = 60) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
