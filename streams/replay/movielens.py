"""MovieLens-100k as a stream of items, impressions and clicks (pure conversion, no Kafka).

MovieLens only records what a user rated, not what they were shown, so the
replay reconstructs an impression for every rating:

* **Items** — one :class:`~contract.records.Item` per catalog row of
  ``ml-100k.item``: ``text = "title (year)"`` (the year is left out when it is
  missing or not a plausible year, and not repeated when the title already ends
  with it; the one row whose title is missing gets ``"unknown movie"``),
  ``categories`` = its genres (the placeholder genre ``unknown`` is dropped, so
  such items have no category).  Every item carries ``ts`` = the **first event
  time of the replay** (the earliest rating of the dataset, or of the chosen
  ``users``), so the catalog is in place when the replay starts and the whole
  stream is ordered in event time.
* **Impressions** — one per rating, in event-time order (ties keep the file
  order): the slate holds the rated item plus ``slate_size - 1`` distinct
  catalog items the user has **never** rated (in the whole dataset), sampled
  uniformly with a seeded RNG.  The rated item's position is drawn uniformly
  from the same RNG, so position does not leak the label.  ``impression_id`` is
  ``"ml-<user>-<item>"`` (unique: a user rates an item once), ``user_id`` the
  MovieLens user id, ``ts`` = rating timestamp × 1000.
* **Clicks** — one per rating ≥ ``min_rating_for_click`` on the rated item,
  ``value`` = the rating, ``ts`` = impression ts + ``click_delay_ms``.

The slates are sampled once for the whole dataset, in event-time order, so a
replay with ``limit`` or ``users`` is exactly the corresponding subsequence of
the full replay with the same seed and slate size.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from contract.errors import ConfigError, StreamrecError
from contract.records import Click, Impression, Item
from contract.topics import CLICKS, IMPRESSIONS, ITEMS
from streams.replay import ReplayEvent, event_order

log = logging.getLogger(__name__)

INTER_FILE = "ml-100k.inter"
ITEM_FILE = "ml-100k.item"
UNKNOWN_TITLE = "unknown movie"
_MISSING = {"", "unknown", "unkonwn"}  # ml-100k spells item 267 "unkonwn"
_YEAR = re.compile(r"^\d{4}$")
_CHUNK = 16_384  # rows per vectorised sampling step (bounds memory)
_KIND_IMPRESSION, _KIND_CLICK = 0, 1


class MovieLensError(StreamrecError):
    """The MovieLens files are missing or do not look like MovieLens."""


# --- the files -----------------------------------------------------------------------


@dataclass(frozen=True)
class Movie:
    """One row of ``ml-100k.item``, cleaned."""

    item_id: str
    title: str | None
    year: int | None
    genres: tuple[str, ...]

    def text(self) -> str:
        title = self.title or UNKNOWN_TITLE
        if self.year is None or title.endswith(f"({self.year})"):
            return title
        return f"{title} ({self.year})"

    def to_item(self, ts: int) -> Item:
        return Item(item_id=self.item_id, text=self.text(), categories=list(self.genres), ts=ts)


@dataclass(frozen=True, eq=False)
class MovieLensData:
    """The ratings (one array entry per row of ``ml-100k.inter``, file order) and the catalog."""

    movies: tuple[Movie, ...]
    user_ids: np.ndarray  # str, per rating
    item_index: np.ndarray  # int64 index into ``movies``, per rating
    ratings: np.ndarray  # float64
    timestamps_ms: np.ndarray  # int64 epoch ms

    def __len__(self) -> int:
        return len(self.ratings)


def _header(path: Path, line: str, required: Iterable[str]) -> dict[str, int]:
    cols = {name.split(":")[0]: i for i, name in enumerate(line.rstrip("\r\n").split("\t"))}
    missing = [c for c in required if c not in cols]
    if missing:
        raise MovieLensError(f"{path}: header lacks column(s) {missing}; found {sorted(cols)}")
    return cols


def _year(raw: str) -> int | None:
    raw = raw.strip()
    if _YEAR.match(raw) and 1850 <= int(raw) <= 2100:
        return int(raw)
    return None


def load_movies(path: Path) -> tuple[Movie, ...]:
    """Parse ``ml-100k.item`` (tab-separated, typed header ``item_id:token ...``)."""
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    if not lines:
        raise MovieLensError(f"{path}: empty file")
    cols = _header(path, lines[0], ("item_id", "movie_title", "release_year", "class"))
    width = max(cols.values()) + 1
    movies: list[Movie] = []
    seen: set[str] = set()
    no_title = no_year = 0
    for lineno, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r\n")
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) < width:
            raise MovieLensError(
                f"{path}:{lineno}: expected {width} tab-separated fields, got {len(fields)}"
            )
        item_id = fields[cols["item_id"]].strip()
        if not item_id:
            raise MovieLensError(f"{path}:{lineno}: empty item_id")
        if item_id in seen:
            raise MovieLensError(f"{path}:{lineno}: duplicate item_id {item_id!r}")
        seen.add(item_id)
        title = fields[cols["movie_title"]].strip()
        if title.lower() in _MISSING:
            title, no_title = "", no_title + 1
        year = _year(fields[cols["release_year"]])
        no_year += year is None
        genres = tuple(g for g in fields[cols["class"]].split() if g.lower() != "unknown")
        movies.append(Movie(item_id, title or None, year, genres))
    log.info(
        "%s: %d movies (%d without title, %d without a valid year)",
        path.name,
        len(movies),
        no_title,
        no_year,
    )
    return tuple(movies)


def load_ratings(path: Path, movies: tuple[Movie, ...]) -> MovieLensData:
    """Parse ``ml-100k.inter`` (tab-separated: user_id, item_id, rating, timestamp in seconds)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline()
        if not header:
            raise MovieLensError(f"{path}: empty file")
        cols = _header(path, header, ("user_id", "item_id", "rating", "timestamp"))
        rows = [line.rstrip("\r\n").split("\t") for line in f if line.strip()]
    width = max(cols.values()) + 1
    for n, r in enumerate(rows):
        if len(r) < width:
            raise MovieLensError(
                f"{path}:{n + 2}: expected {width} tab-separated fields, got {len(r)}"
            )
    table = (
        np.array(rows, dtype=object).reshape(len(rows), -1)
        if rows
        else np.empty((0, width), object)
    )
    users = table[:, cols["user_id"]].astype(str)
    items = table[:, cols["item_id"]].astype(str)
    try:
        ratings = table[:, cols["rating"]].astype(np.float64)
        seconds = table[:, cols["timestamp"]].astype(np.float64)
    except ValueError as exc:
        raise MovieLensError(f"{path}: a rating or timestamp is not a number ({exc})") from None
    if not (np.isfinite(ratings).all() and np.isfinite(seconds).all() and (seconds >= 0).all()):
        raise MovieLensError(f"{path}: ratings and timestamps must be finite, timestamps >= 0")
    index_of = {m.item_id: i for i, m in enumerate(movies)}
    unknown = sorted({i for i in items.tolist() if i not in index_of})
    if unknown:
        raise MovieLensError(
            f"{path}: {len(unknown)} rated item(s) not in the catalog, e.g. {unknown[:5]}"
        )
    item_index = np.fromiter(
        (index_of[i] for i in items.tolist()), dtype=np.int64, count=len(items)
    )
    pairs = np.char.add(np.char.add(users, "\t"), items)
    if len(np.unique(pairs)) != len(pairs):
        raise MovieLensError(
            f"{path}: a user rated the same item twice; impression ids would collide"
        )
    timestamps_ms = np.round(seconds * 1000).astype(np.int64)
    return MovieLensData(movies, users, item_index, ratings, timestamps_ms)


def load(path: Path | None = None) -> MovieLensData:
    """Load MovieLens-100k from ``path`` (default: fetched into the cache by ``infra.assets``)."""
    if path is None:
        from infra.assets import movielens_path

        path = movielens_path()
    path = Path(path)
    for name in (INTER_FILE, ITEM_FILE):
        if not (path / name).is_file():
            raise MovieLensError(
                f"{path / name} not found (fetch it with `python -m infra.assets data`)"
            )
    movies = load_movies(path / ITEM_FILE)
    return load_ratings(path / INTER_FILE, movies)


# --- the replay ------------------------------------------------------------------------


@dataclass(frozen=True)
class MovieLensReplayConfig:
    """How ratings become impressions and clicks.

    slate_size: items per impression (the rated one + ``slate_size - 1`` unrated).
    seed: seeds the negative sampling and the rated item's position.
    click_delay_ms: event time from an impression to its click.
    min_rating_for_click: a rating at least this high produces a click.
    limit: replay only the first ``limit`` ratings in event-time order (after ``users``).
    users: replay only these user ids (all when None).
    """

    slate_size: int = 10
    seed: int = 0
    click_delay_ms: int = 5_000
    min_rating_for_click: float = 4.0
    limit: int | None = None
    users: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.slate_size <= 1000:
            raise ConfigError("slate_size", f"must be in 1..1000, got {self.slate_size}")
        if self.click_delay_ms < 0:
            raise ConfigError("click_delay_ms", f"must be >= 0, got {self.click_delay_ms}")
        if self.limit is not None and self.limit < 0:
            raise ConfigError("limit", f"must be >= 0, got {self.limit}")
        if self.seed < 0:
            raise ConfigError("seed", f"must be >= 0, got {self.seed}")
        if self.users is not None and not isinstance(self.users, frozenset):
            object.__setattr__(self, "users", frozenset(str(u) for u in self.users))


class MovieLensReplay:
    """The items, impressions and clicks of one replay; arrays are computed once, records lazily.

    >>> replay = MovieLensReplay(load(), MovieLensReplayConfig(limit=500))  # doctest: +SKIP
    >>> replay.counts()  # doctest: +SKIP
    {'items': 1682, 'impressions': 500, 'clicks': 274}
    """

    def __init__(self, data: MovieLensData, config: MovieLensReplayConfig | None = None) -> None:
        self.data = data
        self.config = config or MovieLensReplayConfig()
        k = self.config.slate_size
        if k > len(data.movies):
            raise ConfigError("slate_size", f"{k} exceeds the catalog of {len(data.movies)} items")
        self._item_ids = np.array([m.item_id for m in data.movies], dtype=object)
        unrated = len(data.movies) - self._rated.sum(axis=1)
        if len(unrated) and unrated.min() < k - 1:
            worst = self._users[int(unrated.argmin())]
            raise ConfigError(
                "slate_size",
                f"{k} is too large: user {worst} has only {int(unrated.min())} unrated items "
                f"for the {k - 1} other slots",
            )

    @classmethod
    def from_path(
        cls, path: Path | None = None, config: MovieLensReplayConfig | None = None
    ) -> MovieLensReplay:
        return cls(load(path), config)

    # --- arrays -------------------------------------------------------------------------
    @cached_property
    def _order(self) -> np.ndarray:
        """Rating rows in event-time order; equal timestamps keep the file order."""
        return np.argsort(self.data.timestamps_ms, kind="stable")

    @cached_property
    def _user_index(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct user ids, index of each rating's user into them)."""
        return np.unique(self.data.user_ids, return_inverse=True)

    @property
    def _users(self) -> np.ndarray:
        return self._user_index[0]

    @cached_property
    def _rated(self) -> np.ndarray:
        """Boolean (users, catalog): which items each user rated anywhere in the dataset."""
        rated = np.zeros((len(self._users), len(self.data.movies)), dtype=bool)
        rated[self._user_index[1], self.data.item_index] = True
        return rated

    @cached_property
    def _slates(self) -> np.ndarray:
        """Catalog indices, shape (ratings, slate_size), row r = the r-th rating in event time."""
        data, k = self.data, self.config.slate_size
        n, rated = len(data), self._rated
        rng = np.random.default_rng(self.config.seed)
        order = self._order
        positive = data.item_index[order]
        user_of = self._user_index[1][order]
        position = rng.integers(0, k, size=n)
        negatives = np.empty((n, k - 1), dtype=np.int64)
        draws = 4 * (k - 1) + 16  # > k-1 valid draws with overwhelming probability; else fallback
        for start in range(0, n, _CHUNK):
            rows = slice(start, min(start + _CHUNK, n))
            negatives[rows] = _sample_unrated(rng, rated, user_of[rows], k - 1, draws)
        slates = np.empty((n, k), dtype=np.int64)
        is_positive = np.arange(k)[None, :] == position[:, None]
        slates[is_positive] = positive
        slates[~is_positive] = negatives.ravel()
        return slates

    @cached_property
    def _selected(self) -> np.ndarray:
        """Positions (into the event-time order) of the replayed ratings."""
        selected = np.arange(len(self.data))
        if self.config.users is not None:
            users = self.data.user_ids[self._order]
            selected = selected[np.isin(users, np.array(sorted(self.config.users), dtype=str))]
        if self.config.limit is not None:
            selected = selected[: self.config.limit]
        return selected

    @cached_property
    def _clicked(self) -> np.ndarray:
        """Mask over ``_selected``: the ratings that produce a click."""
        rows = self._order[self._selected]
        return self.data.ratings[rows] >= self.config.min_rating_for_click

    def time_range(self) -> tuple[int, int]:
        """(first, last) event time of the replayed impressions and clicks, epoch ms."""
        ts = self.data.timestamps_ms[self._order[self._selected]]
        if not len(ts):
            return self.items_ts, self.items_ts
        last_click = (
            int(ts[self._clicked].max()) + self.config.click_delay_ms if self._clicked.any() else 0
        )
        return int(ts[0]), max(int(ts[-1]), last_click)

    @property
    def items_ts(self) -> int:
        """Event time of every Item record: the first replayed rating.

        That is the first rating of the dataset unless ``users`` is given (then
        the first rating of those users, so a paced replay does not wait for
        them); the first rating of the dataset when nothing is selected, 0 for
        an empty dataset.
        """
        if len(self._selected):
            return int(self.data.timestamps_ms[self._order[self._selected[0]]])
        return int(self.data.timestamps_ms.min()) if len(self.data) else 0

    # --- records --------------------------------------------------------------------------
    def items(self) -> list[Item]:
        ts = self.items_ts
        return [m.to_item(ts) for m in self.data.movies]

    def counts(self) -> dict[str, int]:
        """Records per logical topic, without building them."""
        return {
            ITEMS.name: len(self.data.movies),
            IMPRESSIONS.name: len(self._selected),
            CLICKS.name: int(self._clicked.sum()),
        }

    def __len__(self) -> int:
        return sum(self.counts().values())

    def stream(self) -> Iterator[ReplayEvent]:
        """All records in event-time order: the items, then impressions and clicks merged.

        At equal event time an impression comes before a click, so a click is
        never ahead of its impression (even with ``click_delay_ms=0``).
        """
        for item in self.items():
            yield ITEMS, item
        sel = self._selected
        rows = self._order[sel]
        data = self.data
        ts = data.timestamps_ms[rows]
        clicked = np.flatnonzero(self._clicked)
        click_ts = ts[clicked] + self.config.click_delay_ms
        order = event_order(
            np.concatenate([ts, click_ts]),
            np.concatenate(
                [np.full(len(ts), _KIND_IMPRESSION), np.full(len(clicked), _KIND_CLICK)]
            ),
            np.concatenate([np.arange(len(ts)), clicked]),
        )
        user_ids = data.user_ids[rows].tolist()
        rated_ids = self._item_ids[data.item_index[rows]].tolist()
        ratings = data.ratings[rows].tolist()
        ts_list = ts.tolist()
        slates = self._slates[sel]
        item_ids = self._item_ids
        n = len(ts)
        for j in order.tolist():
            if j < n:
                yield (
                    IMPRESSIONS,
                    Impression(
                        impression_id=f"ml-{user_ids[j]}-{rated_ids[j]}",
                        user_id=user_ids[j],
                        items=item_ids[slates[j]].tolist(),
                        ts=ts_list[j],
                    ),
                )
            else:
                i = int(clicked[j - n])
                yield (
                    CLICKS,
                    Click(
                        impression_id=f"ml-{user_ids[i]}-{rated_ids[i]}",
                        user_id=user_ids[i],
                        item_id=rated_ids[i],
                        value=ratings[i],
                        ts=ts_list[i] + self.config.click_delay_ms,
                    ),
                )


def _sample_unrated(
    rng: np.random.Generator, rated: np.ndarray, users: np.ndarray, m: int, draws: int
) -> np.ndarray:
    """For each user in ``users``, ``m`` distinct catalog indices that user has not rated.

    Vectorised rejection sampling: draw ``draws`` candidates per row, drop rated
    ones and repeats (keeping first occurrences), keep the first ``m``.  The rare
    row left short falls back to an exact ``rng.choice`` over its unrated items.
    """
    n, n_items = len(users), rated.shape[1]
    out = np.empty((n, m), dtype=np.int64)
    if m == 0 or n == 0:
        return out
    cand = rng.integers(0, n_items, size=(n, draws))
    valid = ~rated[users[:, None], cand]
    srt = np.argsort(cand, axis=1, kind="stable")
    sorted_cand = np.take_along_axis(cand, srt, axis=1)
    repeat = np.zeros_like(valid)
    np.put_along_axis(repeat, srt[:, 1:], sorted_cand[:, 1:] == sorted_cand[:, :-1], axis=1)
    valid &= ~repeat
    enough = valid.sum(axis=1) >= m
    keep = valid & (np.cumsum(valid, axis=1) <= m)
    out[enough] = cand[enough][keep[enough]].reshape(-1, m)
    for r in np.flatnonzero(~enough):
        out[r] = rng.choice(np.flatnonzero(~rated[users[r]]), size=m, replace=False)
    return out
