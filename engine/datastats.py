"""Token statistics of a dataset with the model's own tokenizer: lengths, truncation, duplicates.

Rows stream in through StatsCollector.add (read_dataset's on_row), are rendered with the chosen
template and tokenised in batches (the fast tokenizer's batch call runs in Rust, in parallel),
so a 100k-row file is measured without holding its text.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from engine.data import Row
from engine.templates import Template

BATCH = 512  # rows per tokenizer call
MAX_LISTED = 200  # truncated/duplicate rows named one by one; the counts are always complete


@dataclass
class DataStats:
    max_seq_len: int
    packed: bool = False  # plain-text rows are packed into blocks: nothing is cut
    lines: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per row, before truncation
    truncated: list[tuple[int, int, int]] = field(default_factory=list)  # (line, tokens, tokens cut)
    truncated_count: int = 0
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, line of its first copy)
    duplicate_count: int = 0

    @property
    def rows(self) -> int:
        return len(self.lengths)

    @property
    def truncated_share(self) -> float:
        return self.truncated_count / self.rows if self.rows else 0.0

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens the model processes in one pass: every token when packed, else up to max_seq_len."""
        if self.packed:
            return sum(self.lengths)
        return sum(min(n, self.max_seq_len) for n in self.lengths)

    def histogram(self, bins: int = 20) -> list[dict]:
        """Bars of (start, end] token counts; max_seq_len is always a bar edge, so bars are whole."""
        if not self.lengths:
            return []
        longest, limit = max(self.lengths), self.max_seq_len
        inside = max(1, min(bins, round(bins * limit / max(longest, limit))))
        edges = [round(i * limit / inside) for i in range(inside + 1)]
        if longest > limit:
            outside = min(10, math.ceil((longest - limit) / (limit / inside)))
            step = math.ceil((longest - limit) / outside)
            edges += [limit + i * step for i in range(1, outside + 1)]
        counts = [0] * (len(edges) - 1)
        for n in self.lengths:
            counts[_bin(edges, n)] += 1
        return [{"start": edges[i], "end": edges[i + 1], "count": counts[i],
                 "cut": not self.packed and edges[i] >= limit} for i in range(len(counts))]

    def to_dict(self) -> dict:
        return {
            "rows": self.rows,
            "max_seq_len": self.max_seq_len,
            "packed": self.packed,
            "tokens_per_epoch": self.tokens_per_epoch,
            "longest": max(self.lengths, default=0),
            "mean": round(sum(self.lengths) / self.rows, 1) if self.rows else 0,
            "truncated_count": self.truncated_count,
            "truncated_share": round(self.truncated_share, 4),
            "truncated": [{"line": line, "tokens": n, "cut": cut} for line, n, cut in self.truncated],
            "duplicate_count": self.duplicate_count,
            "duplicates": [{"line": line, "first_line": first} for line, first in self.duplicates],
            "histogram": self.histogram(),
        }

    def summary(self) -> str:
        lines = [f"{self.rows:,} rows, {self.tokens_per_epoch:,} training tokens per epoch "
                 f"(longest row {max(self.lengths, default=0):,} tokens)"]
        if self.packed:
            lines.append(f"plain text is packed into blocks of {self.max_seq_len} tokens: nothing is cut")
        elif self.truncated_count:
            lines.append(f"{self.truncated_count:,} rows ({self.truncated_share:.1%}) are longer than "
                         f"max_seq_len={self.max_seq_len} and would be cut: "
                         + ", ".join(f"line {line} loses {cut} of {n} tokens"
                                     for line, n, cut in self.truncated[:5])
                         + (" ..." if self.truncated_count > 5 else ""))
        else:
            lines.append(f"no row is longer than max_seq_len={self.max_seq_len}")
        if self.duplicate_count:
            lines.append(f"{self.duplicate_count:,} duplicate rows: "
                         + ", ".join(f"line {line} repeats line {first}" for line, first in self.duplicates[:5])
                         + (" ..." if self.duplicate_count > 5 else ""))
        return "\n".join(lines)


def _bin(edges: list[int], n: int) -> int:
    for i in range(len(edges) - 1):
        if n <= edges[i + 1]:
            return i
    return len(edges) - 2


class StatsCollector:
    """Feed rows with add(row), then finish() for the DataStats."""

    def __init__(self, tokenizer, template: Template, max_seq_len: int):
        self.tokenizer, self.template = tokenizer, template
        self.stats = DataStats(max_seq_len)
        self.buffer: list[tuple[int, str, bool]] = []
        self.seen: dict[bytes, int] = {}

    def add(self, row: Row) -> None:
        content = row.text if row.is_text else json.dumps(row.messages, sort_keys=True)
        key = hashlib.blake2b(content.encode(), digest_size=12).digest()
        first = self.seen.setdefault(key, row.line)
        if first != row.line:
            self.stats.duplicate_count += 1
            if len(self.stats.duplicates) < MAX_LISTED:
                self.stats.duplicates.append((row.line, first))
        text = row.text if row.is_text else self.template.render(row.messages)
        self.buffer.append((row.line, text, row.is_text))
        if len(self.buffer) >= BATCH:
            self._flush()

    def finish(self) -> DataStats:
        self._flush()
        return self.stats

    def _flush(self) -> None:
        if not self.buffer:
            return
        plain = self.buffer[0][2]  # one file, one format: all rows are text, or none
        texts = [text for _, text, _ in self.buffer]
        special = plain or self.template.add_special_tokens
        ids = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        extra = int(plain and self.tokenizer.eos_token_id is not None)  # EOS appended to text rows
        stats, limit = self.stats, self.stats.max_seq_len
        stats.packed = plain
        for (line, _, _), tokens in zip(self.buffer, ids):
            n = len(tokens) + extra
            stats.lines.append(line)
            stats.lengths.append(n)
            if n > limit and not plain:
                stats.truncated_count += 1
                if len(stats.truncated) < MAX_LISTED:
                    stats.truncated.append((line, n, n - limit))
        self.buffer = []
