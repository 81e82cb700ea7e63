"""Every topic of DESIGN.md, declared once.  Agents, services and the admin import these."""

from __future__ import annotations

from dataclasses import dataclass, field

from contract.records import (
    Click,
    DeadLetter,
    Impression,
    Item,
    Labeled,
    ModelUpdate,
    Recommendation,
    Record,
    RecRequest,
    UserHistory,
)
from contract.settings import KafkaSettings


@dataclass(frozen=True)
class TopicSpec:
    """A logical topic: its DESIGN.md name, value type, and whether it is compacted."""

    name: str
    record: type[Record]
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)

    def real_name(self, settings: KafkaSettings) -> str:
        return settings.topic(self.name)

    def topic_config(self) -> dict[str, str]:
        conf = {"cleanup.policy": "compact" if self.compacted else "delete"}
        conf.update(self.config)
        return conf


ITEMS = TopicSpec("items", Item, compacted=True)
IMPRESSIONS = TopicSpec("impressions", Impression)
CLICKS = TopicSpec("clicks", Click)
LABELED = TopicSpec("labeled", Labeled)
USER_HISTORY = TopicSpec("user-history", UserHistory, compacted=True)
REC_REQUESTS = TopicSpec("rec-requests", RecRequest)
RECOMMENDATIONS = TopicSpec("recommendations", Recommendation)
MODEL_UPDATES = TopicSpec("model-updates", ModelUpdate, compacted=True)
DEAD_LETTERS = TopicSpec("dead-letters", DeadLetter)

ALL_TOPICS: tuple[TopicSpec, ...] = (
    ITEMS,
    IMPRESSIONS,
    CLICKS,
    LABELED,
    USER_HISTORY,
    REC_REQUESTS,
    RECOMMENDATIONS,
    MODEL_UPDATES,
    DEAD_LETTERS,
)
BY_NAME: dict[str, TopicSpec] = {t.name: t for t in ALL_TOPICS}

assert {t.name for t in ALL_TOPICS} == {t.record.TOPIC for t in ALL_TOPICS}
