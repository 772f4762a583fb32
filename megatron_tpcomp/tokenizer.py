"""Text tokenizer for converted checkpoints: a Hugging Face ``tokenizers`` JSON with the interface Megatron's
text generation controller expects (``tokenize``, ``detokenize``, ``eod``, ``bos``, ``vocab_size``)."""

from __future__ import annotations

from pathlib import Path


class TextTokenizer:
    """Byte-level BPE tokenizer loaded from a ``tokenizer.json`` (as written by ``tpcomp convert``).

    Args:
        path: the ``tokenizer.json`` file.
        eos_id: end-of-document id (generation stops on it); ``bos_id``: prepended by nobody here (SmolLM2
            does not use one), recorded for callers.
    """

    def __init__(self, path: str | Path, *, eos_id: int | None, bos_id: int | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tk = Tokenizer.from_file(str(self.path))
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        if eos_id is None or not 0 <= eos_id < self.vocab_size:
            raise ValueError(f"{self.path}: eos id {eos_id!r} is not a token id (vocab {self.vocab_size})")
        self.eod = eos_id
        self.bos = bos_id

    @classmethod
    def from_checkpoint(cls, meta: object) -> TextTokenizer:
        """The tokenizer recorded in a :class:`~megatron_tpcomp.checkpoint.CheckpointMeta`."""
        path = getattr(meta, "tokenizer_path", None)
        if path is None:
            raise ValueError(f"checkpoint {getattr(meta, 'path', '?')} records no tokenizer")
        info = meta.tokenizer  # type: ignore[attr-defined]
        return cls(path, eos_id=info.get("eos_id"), bos_id=info.get("bos_id"))

    def tokenize(self, text: str) -> list[int]:
        return self._tk.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: list[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def offsets(self, ids: list[int], text: str) -> list[int]:
        """Character offset of each token in ``text`` (Megatron asks for these with ``return_segments``)."""
        return [start for start, _ in self._tk.encode(text, add_special_tokens=False).offsets]
