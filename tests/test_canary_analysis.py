"""The canary analysis alone: its config and refusals, interval arithmetic on the gateway's
real Prometheus output, and the verdicts: rollback on errors, latency, drift, a worse
realized metric or a disagreeing shadow; promotion after K passing intervals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import generate_latest

from common.registry import (
    ANALYSIS_CHECK_TAG,
    ANALYSIS_PASSED_TAG,
    ANALYSIS_VERDICT_TAG,
    analysis_blocks,
)
from serving.controller.analysis import (
    AnalysisConfig,
    CanaryAnalyst,
    Sources,
    Traffic,
    scrape,
)
from serving.gateway.metrics import GatewayMetrics

MODEL = "churn"


@dataclass
class Version:
    tags: dict[str, str]


@dataclass
class Registry:
    """The few MlflowClient calls the analyst makes, on dictionaries."""

    aliases: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)

    def get_model_version(self, model: str, version: str) -> Version:
        return Version(dict(self.tags.get(version, {})))

    def set_model_version_tag(self, model: str, version: str, key: str, value: str) -> None:
        self.tags.setdefault(version, {})[key] = value

    def set_registered_model_alias(self, model: str, alias: str, version: str) -> None:
        self.aliases[alias] = version

    def delete_registered_model_alias(self, model: str, alias: str) -> None:
        del self.aliases[alias]


class World:
    """A gateway's real metrics registry, a monitor's answers, a clock and alert sink."""

    def __init__(self, **config: Any) -> None:
        self.metrics = GatewayMetrics()
        self.monitor: dict[str, dict[str, Any]] = {}
        self.shadow: dict[str, Any] | None = None
        self.alerts: list[tuple[str, dict[str, Any]]] = []
        self.now = 1000.0
        self.registry = Registry(aliases={"production": "1", "canary": "2"})
        self.config = AnalysisConfig(interval_s=60, min_requests=50, **config)
        self.analyst = self.new_analyst()

    def new_analyst(self) -> CanaryAnalyst:
        sources = Sources(
            gateway_metrics=lambda: generate_latest(self.metrics.registry).decode(),
            gateway_models=lambda: [{"name": MODEL, "shadow": self.shadow}],
            monitor=lambda path: self.monitor.get(path.split("?")[0]),
            post_alert=lambda url, body: self.alerts.append((url, body)),
            webhooks=("http://hooks/alert",),
        )
        return CanaryAnalyst(self.registry, sources, clock=lambda: self.now)

    def traffic(self, version: str, answers: int, errors: int = 0, seconds: float = 0.01) -> None:
        route = self.metrics.for_route(MODEL, version)
        for i in range(answers):
            route.request(500 if i < errors else 200, seconds, False)

    def look(self, canary: str | None = "2", shadow: str | None = None) -> list:
        judged = self.analyst.analyze(MODEL, self.config, "1", canary, shadow)
        self.now += 61
        return judged


def test_the_config_has_defaults_and_refuses_what_it_cannot_use() -> None:
    assert AnalysisConfig.from_tag(None) == AnalysisConfig()
    parsed = AnalysisConfig.from_tag(
        '{"interval_s": 30, "promote_after": 5.0, "rollback_on_drift": false}'
    )
    assert (parsed.interval_s, parsed.promote_after, parsed.rollback_on_drift) == (30, 5, False)
    for bad, says in [
        ("{", "not JSON"),
        ("[1]", "JSON object"),
        ('{"interval": 3}', "unknown keys"),
        ('{"interval_s": 0}', "interval_s"),
        ('{"max_error_rate_increase": -0.1}', ">= 0"),
        ('{"min_requests": true}', "a number"),
        ('{"rollback_on_drift": "yes"}', "true or false"),
        ('{"min_agreement": 2}', "from 0 to 1"),
        ('{"max_p99_ratio": NaN}', "finite"),
    ]:
        with pytest.raises(ValueError, match=says):
            AnalysisConfig.from_tag(bad)


def test_intervals_and_quantiles_come_from_the_gateways_own_metrics() -> None:
    world = World()
    world.traffic("1", 100, errors=2, seconds=0.004)
    world.traffic("2", 10, errors=1, seconds=0.2)
    text = generate_latest(world.metrics.registry).decode()
    traffic = scrape(text, MODEL)
    assert (traffic["1"].requests, traffic["1"].errors) == (100, 2)
    assert traffic["2"].error_rate == pytest.approx(0.1)
    assert traffic["1"].quantile(0.99) <= 0.005 < 0.2 <= traffic["2"].quantile(0.99)
    world.traffic("1", 50, errors=5)
    later = scrape(generate_latest(world.metrics.registry).decode(), MODEL)["1"]
    added = later.since(traffic["1"])
    assert (added.requests, added.errors) == (50, 5)
    assert added.since(Traffic(1e9, 0)) == added  # counters reset (a restarted gateway)
    assert scrape(text, "other") == {}


def test_a_canary_that_fails_requests_is_rolled_back_with_its_numbers_and_an_alert() -> None:
    world = World()
    assert world.look() == []  # the first look starts the interval
    world.traffic("1", 900)
    world.traffic("2", 100, errors=20)
    [(role, version, checks)] = world.look()
    assert (role, version) == ("canary", "2")
    assert [c.name for c in checks if c.failed] == ["error_rate"]
    assert "canary" not in world.registry.aliases and world.registry.aliases["production"] == "1"
    tags = world.registry.tags["2"]
    assert tags[ANALYSIS_CHECK_TAG] == "error_rate" and analysis_blocks(tags)
    assert "20.00% of 100 answers" in tags["flowline.analysis.reason"]
    [(url, alert)] = world.alerts
    assert url == "http://hooks/alert" and alert["event"] == "canary_rolled_back"
    assert alert["check"] == "error_rate" and alert["version"] == "2"


def test_a_slow_canary_fails_the_latency_check() -> None:
    world = World()
    world.look()
    world.traffic("1", 500, seconds=0.01)
    world.traffic("2", 100, seconds=0.9)
    [(_, _, checks)] = world.look()
    assert [c.name for c in checks if c.failed] == ["p99"]
    assert world.registry.tags["2"][ANALYSIS_CHECK_TAG] == "p99"


def test_too_little_canary_traffic_is_not_judged() -> None:
    world = World()
    world.look()
    world.traffic("2", 49, errors=49)
    assert world.look() == [] and world.registry.aliases["canary"] == "2"


def test_a_healthy_canary_passes_and_is_promoted_after_k_intervals_across_a_restart() -> None:
    world = World(promote_after=3)
    world.look()
    for _ in range(2):
        world.traffic("1", 400, errors=4)
        world.traffic("2", 100, errors=1)
        [(_, _, checks)] = world.look()
        assert not any(c.failed for c in checks)
    assert world.registry.tags["2"][ANALYSIS_PASSED_TAG] == "2"
    assert world.registry.aliases["production"] == "1"
    world.analyst = world.new_analyst()  # a restarted controller: the count is a tag
    world.look()
    world.traffic("2", 100)
    world.traffic("1", 400)
    world.look()
    assert world.registry.aliases == {"production": "2"}
    assert world.registry.tags["2"][ANALYSIS_VERDICT_TAG] == "promoted"


def test_drift_on_the_canarys_own_traffic_rolls_it_back() -> None:
    world = World()
    world.monitor["/drift/churn"] = {
        "versions": [{"latest_window": {"drifted": True, "drifted_features": ["tenure"]}}]
    }
    world.look()
    world.traffic("1", 400)
    world.traffic("2", 100)
    [(_, _, checks)] = world.look()
    assert [c.name for c in checks if c.failed] == ["drift"]
    assert "tenure" in world.registry.tags["2"]["flowline.analysis.reason"]
    off = World(rollback_on_drift=False)
    off.monitor = world.monitor
    off.look()
    off.traffic("2", 100)
    off.look()
    assert off.registry.aliases["canary"] == "2"


def test_a_worse_realized_metric_rolls_the_canary_back_once_it_has_labels() -> None:
    world = World()
    world.monitor["/performance/churn"] = {
        "versions": [
            {
                "version": "1",
                "metric": "accuracy",
                "realized": {"accuracy": 0.8},
                "labelled_rows": 500,
            },
            {
                "version": "2",
                "metric": "accuracy",
                "realized": {"accuracy": 0.6},
                "labelled_rows": 40,
            },
        ]
    }
    world.look()
    world.traffic("2", 100)
    [(_, _, checks)] = world.look()
    assert "metric" not in [c.name for c in checks]  # 40 labels: fewer than min_labelled_rows
    world.monitor["/performance/churn"]["versions"][1]["labelled_rows"] = 60
    world.traffic("2", 100)
    [(_, _, checks)] = world.look()
    assert [c.name for c in checks if c.failed] == ["metric"]


def test_a_shadow_that_disagrees_loses_its_alias() -> None:
    world = World()
    world.registry.aliases = {"production": "1", "shadow": "3"}
    world.shadow = {"mirrored": 0, "errors": 0, "compared_rows": 0, "agreement": None}
    world.look(canary=None, shadow="3")
    world.shadow = {"mirrored": 100, "errors": 0, "compared_rows": 100, "agreement": 0.95}
    [(role, _, checks)] = world.look(canary=None, shadow="3")
    assert role == "shadow" and not any(c.failed for c in checks)
    world.shadow = {"mirrored": 200, "errors": 0, "compared_rows": 200, "agreement": 0.6}
    [(_, _, checks)] = world.look(canary=None, shadow="3")
    assert [c.name for c in checks if c.failed] == ["agreement"]
    assert world.registry.aliases == {"production": "1"}
    assert world.alerts[0][1]["role"] == "shadow"
