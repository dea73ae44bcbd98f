from __future__ import annotations

import tomllib
from pathlib import Path

import attrs
import pytest

from lars.config import Config, load_config, store_url
from lars.core.balancer import BalancerParams
from lars.errors import ConfigError

REPO_TOML = Path(__file__).resolve().parent.parent / "lars.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lars.toml"
    path.write_text(text)
    return path


def test_defaults_are_the_original_lars_values() -> None:
    lb = Config().agent.loadbalance
    assert (lb.probe_num, lb.init_succ_cnt, lb.init_err_cnt) == (10, 180, 5)
    assert (lb.err_rate, lb.succ_rate, lb.window_err_rate) == (0.1, 0.5, 0.7)
    assert (lb.contin_err_limit, lb.contin_succ_limit) == (15, 15)
    assert (lb.idle_timeout, lb.overload_timeout, lb.update_timeout) == (15, 15, 15)
    config = Config()
    assert config.store == "sqlite:///lars.db"
    assert config.dns.listen == "127.0.0.1:7778"
    assert config.reporter.listen == "127.0.0.1:7779"
    assert (config.agent.base_port, config.agent.ports) == (8888, 3)
    assert (config.dns.check_interval, config.dns.reload_interval) == (1.0, 10.0)
    assert config.agent.report_interval == 1.0


def test_no_file_and_no_local_lars_toml_gives_defaults(tmp_path: Path) -> None:
    assert load_config(cwd=tmp_path) == Config()


def test_local_lars_toml_is_used_when_present(tmp_path: Path) -> None:
    write(tmp_path, 'store = "sqlite:////tmp/x.db"\n')
    config = load_config(cwd=tmp_path)
    assert config.store == "sqlite:////tmp/x.db"
    assert config.source.endswith("lars.toml")


def test_nested_sections_load_and_ints_become_floats(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[dns]
check_interval = 2
[agent]
dns = ["10.0.0.1:7778", "10.0.0.2:7778"]
[agent.loadbalance]
probe_num = 3
err_rate = 0.2
""",
    )
    config = load_config(path)
    assert config.dns.check_interval == 2.0
    assert isinstance(config.dns.check_interval, float)
    assert config.agent.dns == ["10.0.0.1:7778", "10.0.0.2:7778"]
    assert config.agent.loadbalance == BalancerParams(probe_num=3, err_rate=0.2)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("stroe = 'x'\n", "'stroe'"),
        ("[agent]\nbase_prot = 1\n", "'agent.base_prot'"),
        ("[agent.loadbalance]\nprobe_nun = 1\n", "'agent.loadbalance.probe_nun'"),
        ("[nonsense]\n", "'nonsense'"),
    ],
)
def test_unknown_key_is_an_error_naming_key_and_file(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[agent]\nbase_port = '8888'\n", "agent.base_port"),
        ("[agent]\nports = 1.5\n", "agent.ports"),
        ("[agent]\ndns = '127.0.0.1:7778'\n", "agent.dns"),
        ("[dns]\ncheck_interval = true\n", "dns.check_interval"),
        ("[agent.loadbalance]\nerr_rate = 2.0\n", "agent.loadbalance.err_rate"),
        ("[dns]\ncheck_interval = 0\n", "dns.check_interval"),
        ("[dns]\nlisten = 'nowhere'\n", "dns.listen"),
        ("[agent]\nbase_port = 70000\n", "agent.base_port"),
        ("[log]\nlevel = 'loud'\n", "log.level"),
        ("[agent]\nip = '::1'\n", "agent.ip"),
        ("[agent]\nip = 'host.example'\n", "agent.ip"),
        ("[agent]\nreporter = '[::1]:7779'\n", "set [agent] ip"),
        ("[agent]\nmax_frame = 0\n", "agent.max_frame"),
        ("[dns]\nhttp_listen = 'nowhere'\n", "dns.http_listen"),
        ("[log]\nformat = 'xml'\n", "log.format"),
        ("[metrics]\nmax_module_labels = -1\n", "metrics.max_module_labels"),
        ("agent = 3\n", "agent"),
        ("[web]\nlisten = 'nowhere'\n", "web.listen"),
        ("[web]\nhttp_listen = 'nowhere'\n", "web.http_listen"),
        ("[web]\nsecret = 'too short'\n", "web.secret"),
        ("[web]\nusers = 'alice'\n", "web.users"),
        ("[[web.users]]\nname = 'a'\nrole = 'root'\npassword_hash = 'x'\n", "web.users.role"),
        ("[[web.users]]\nname = 'a'\nrole = 'admin'\n", "web.users: missing key"),
        ("[[web.tokens]]\nname = 'a'\nrole = 'admin'\ntoken_hash = 'x'\n", "lars web token"),
    ],
)
def test_wrong_type_or_value_is_an_error_naming_the_key(
    tmp_path: Path, text: str, needle: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert needle in str(info.value)
    assert str(path) in str(info.value)


def test_missing_explicit_file_and_bad_toml_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[agent\n"))


def test_store_override_beats_env_beats_config(monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(store="sqlite:///a.db")
    monkeypatch.delenv("LARS_STORE", raising=False)
    assert store_url(config) == "sqlite:///a.db"
    monkeypatch.setenv("LARS_STORE", "sqlite:///b.db")
    assert store_url(config) == "sqlite:///b.db"
    assert store_url(config, "sqlite:///c.db") == "sqlite:///c.db"


def _keys(cls: type, prefix: str = "") -> set[str]:
    out = set()
    for field in attrs.fields(cls):
        if field.kw_only:
            continue
        default = field.default
        nested = default.factory if isinstance(default, attrs.Factory) else None  # type: ignore[arg-type]
        if nested is not None and attrs.has(nested):
            out |= _keys(nested, f"{prefix}{field.name}.")
        else:
            out.add(prefix + field.name)
    return out


def _flatten(data: dict[str, object], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


def test_repository_lars_toml_documents_every_key_with_its_default() -> None:
    data = tomllib.loads(REPO_TOML.read_text())
    assert set(_flatten(data)) == _keys(Config)
    assert load_config(REPO_TOML) == attrs.evolve(Config(), source=str(REPO_TOML))


def test_alarm_rules_and_webhooks_are_checked_at_load(tmp_path: Path) -> None:
    good = write(
        tmp_path,
        '[alarms]\nwebhooks = ["http://127.0.0.1:9/hook"]\n'
        '[[alarms.rules]]\nname = "errors"\nkind = "error_rate"\nthreshold = 0.2\n'
        '[[alarms.rules]]\nname = "silent"\nkind = "caller_silent"\nsilent = 10\n',
    )
    config = load_config(good)
    assert [r.name for r in config.alarms.rules] == ["errors", "silent"]
    assert config.alarms.rules[0].definition()["threshold"] == 0.2
    for text, message in (
        ('[[alarms.rules]]\nname = "x"\nkind = "cpu_high"\n', "kind must be one of"),
        ('[[alarms.rules]]\nname = "x"\nkind = "error_rate"\nthreshold = 2\n', "threshold"),
        ('[[alarms.rules]]\nname = "x"\nkind = "error_rate"\n', "threshold is missing"),
        (
            '[[alarms.rules]]\nname = "x"\nkind = "no_healthy_host"\n'
            '[[alarms.rules]]\nname = "x"\nkind = "no_healthy_host"\n',
            "appears twice",
        ),
        ("[alarms]\nrules = [1]\n", "must be a table"),
        ('[alarms]\nwebhooks = ["ftp://example/hook"]\n', "http:// or https://"),
        ('[alarms]\nwebhooks = ["http://a/", "http://a/"]\n', "appears twice"),
        ("[alarms]\ninterval = 0\n", "alarms.interval"),
        ("[alarms]\nsnooze = 1\n", "unknown key 'alarms.snooze'"),
    ):
        with pytest.raises(ConfigError, match=message) as info:
            load_config(write(tmp_path, text))
        assert "lars.toml" in str(info.value)
