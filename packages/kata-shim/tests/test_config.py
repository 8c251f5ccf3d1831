"""Configuration lookup order (Kata's) and one clear error per problem, naming file and key."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kata_shim.config import (
    DEFAULT_TEMPLATE_PATH,
    ConfigError,
    FactoryConfig,
    _loader,
    find_config,
    load_config,
    load_config_file,
    shipped_config,
)
from kata_shim.runtime import InvalidArgument


@pytest.fixture
def assets(tmp_path: Path) -> dict[str, Path]:
    files = {}
    for name in ("vmlinuz", "initrd.img", "rootfs.img"):
        files[name] = tmp_path / name
        files[name].write_bytes(b"\0")
    return files


def write_config(path: Path, assets: dict[str, Path], extra: str = "", hv: str = "") -> Path:
    path.write_text(
        f"""
[hypervisor.dragonball]
kernel = "{assets["vmlinuz"]}"
initrd = "{assets["initrd.img"]}"
image = "{assets["rootfs.img"]}"
default_vcpus = 2
default_memory = 1024
kernel_params = "quiet"
memory_slots = 10
{hv}

[agent.kata]
dial_timeout_ms = 5000
kernel_modules = ["vsock"]

[runtime]
name = "virt_container"
hypervisor_name = "dragonball"
enable_tracing = true
{extra}
"""
    )
    return path


@pytest.fixture
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The first of the system configuration files, moved under tmp_path (none of them exists)."""
    paths = tuple(tmp_path / "system" / str(i) / "configuration.toml" for i in range(3))
    monkeypatch.setattr(_loader, "SYSTEM_CONFIGS", paths)
    return paths[0]


def test_lookup_order_env_option_system_shipped(tmp_path: Path, no_system_config: Path) -> None:
    # upstream runtime-rs (runtimes/src/manager.rs load_config): KATA_CONF_FILE, then the option
    env = {"KATA_CONF_FILE": "/from/env.toml"}
    assert find_config("/from/option.toml", env) == (Path("/from/env.toml"), "KATA_CONF_FILE")
    option = (Path("/from/option.toml"), "runtime options config_path")
    assert find_config("/from/option.toml", {}) == option
    assert find_config("", {}) == (shipped_config(), "shipped default")
    no_system_config.parent.mkdir(parents=True)
    no_system_config.write_text("")
    assert find_config("", {}) == (no_system_config, "system default")
    assert find_config("", env)[0] == Path("/from/env.toml")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_each_system_location_is_found_in_upstream_order(tmp_path: Path, index: int) -> None:
    defaults = [tmp_path / name / "configuration.toml" for name in ("etc", "usr-share-defaults", "opt-kata")]
    for path in defaults[index:]:
        path.parent.mkdir(parents=True)
        path.write_text("")
    assert find_config("", {}, defaults) == (defaults[index], "system default")


def test_system_locations_are_upstreams() -> None:
    assert [str(p) for p in _loader.SYSTEM_CONFIGS] == [
        "/etc/kata-containers/runtime-rs/configuration.toml",
        "/usr/share/defaults/kata-containers/runtime-rs/configuration.toml",
        "/opt/kata/share/defaults/kata-containers/runtime-rs/configuration.toml",
    ]


def test_load_reads_every_table(tmp_path: Path, assets: dict[str, Path], no_system_config: Path) -> None:
    path = write_config(tmp_path / "c.toml", assets)
    config = load_config(str(path), env={})
    assert config.path == path
    assert config.runtime.name == "virt_container"
    assert config.runtime.hypervisor_name == "dragonball"
    hv = config.hypervisor
    assert (hv.kernel, hv.initrd, hv.image) == (assets["vmlinuz"], assets["initrd.img"], assets["rootfs.img"])
    assert (hv.default_vcpus, hv.default_memory, hv.kernel_params) == (2, 1024, "quiet")
    assert hv.extra == {"memory_slots": 10}
    assert config.agent.dial_timeout_ms == 5000
    assert config.agent.kernel_modules == ["vsock"]
    assert config.agent.request_timeout_ms == 30_000  # default kept


def test_env_file_is_used_without_option(
    tmp_path: Path, assets: dict[str, Path], no_system_config: Path
) -> None:
    path = write_config(tmp_path / "env.toml", assets)
    assert load_config("", env={"KATA_CONF_FILE": str(path)}).path == path


def test_shipped_default_has_only_known_keys_and_lab_asset_paths() -> None:
    doc = tomllib.loads(shipped_config().read_text())
    hv = doc["hypervisor"]["dragonball"]
    assert hv["kernel"] == "/usr/share/kata-containers/vmlinuz"
    assert hv["initrd"] == "/usr/share/kata-containers/kata-containers-initrd.img"
    assert hv["image"] == "/usr/share/kata-containers/kata-containers.img"
    assert doc["runtime"]["name"] == "virt_container"
    parser = _loader._Parser(shipped_config())
    from kata_shim.config import AgentConfig, RuntimeConfig
    from kata_shim.hypervisor import HypervisorConfig

    for cls, table in (
        (HypervisorConfig, hv),
        (AgentConfig, doc["agent"]["kata"]),
        (RuntimeConfig, doc["runtime"]),
    ):
        _, extra = parser.fill(cls, table, "x")
        assert extra == {}, cls


def test_shipped_default_loads_when_the_assets_exist(
    monkeypatch: pytest.MonkeyPatch, no_system_config: Path
) -> None:
    real_is_file = Path.is_file
    monkeypatch.setattr(
        Path,
        "is_file",
        lambda self: str(self).startswith("/usr/share/kata-containers/") or real_is_file(self),
    )
    config = load_config("", env={})
    assert config.path == shipped_config()
    assert config.hypervisor.default_vcpus >= 1


@pytest.mark.parametrize(
    "case",
    [
        (
            'hypervisor_name = "nosuchvmm"',
            "",
            "runtime.hypervisor_name",
            "unknown hypervisor 'nosuchvmm' (known: clh, dragonball, firecracker, qemu)",
        ),
        ('name = "wasm_container"', "", "runtime.name", "unknown runtime handler 'wasm_container'"),
        ('agent_name = "other"', "", "runtime.agent_name", "unknown agent 'other'"),
        (
            'internetworking_model = "macvtap"',
            "",
            "runtime.internetworking_model",
            "unknown internetworking model 'macvtap' (known: none, route, tcfilter)",
        ),
        ("", 'default_vcpus = "two"', "hypervisor.dragonball.default_vcpus", "must be an integer"),
        ("", "default_vcpus = 0", "hypervisor.dragonball.default_vcpus", "must be at least 1"),
        ("", "enable_debug = 1", "hypervisor.dragonball.enable_debug", "must be true or false"),
        ("", "default_memory = 16", "hypervisor.dragonball.default_memory", "at least 64"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, assets: dict[str, Path], case: tuple[str, ...]) -> None:
    extra, hv, key, problem = case  # a [runtime] line, a [hypervisor.dragonball] line, the key, the message
    # TOML forbids duplicate keys: drop the written line of the key under test first.
    path = write_config(tmp_path / "bad.toml", assets)
    text = path.read_text()
    for line in (extra, hv):
        if line:
            name = line.split("=")[0].strip()
            text = "\n".join(t for t in text.splitlines() if not t.startswith(name + " "))
    text = text.replace("[agent.kata]", f"{hv}\n\n[agent.kata]") + f"\n{extra}\n"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert problem in str(info.value)


def test_missing_kernel_is_named(tmp_path: Path, assets: dict[str, Path]) -> None:
    assets["vmlinuz"].unlink()
    path = write_config(tmp_path / "c.toml", assets)
    with pytest.raises(ConfigError, match=r"hypervisor\.dragonball\.kernel: .*vmlinuz does not exist"):
        load_config_file(path)


def test_missing_file_says_where_its_name_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as info:
        load_config(str(tmp_path / "nope.toml"), env={})
    assert "runtime options config_path" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("[runtime\nname = 1\n", "{path}: not valid TOML", id="invalid-toml-names-the-file"),
        pytest.param(
            '[runtime]\nhypervisor_name = "dragonball"\n',
            "{path}: hypervisor.dragonball: table missing",
            id="missing-hypervisor-table",
        ),
        pytest.param('runtime = "virt_container"\n', "{path}: runtime: must be a table", id="not-a-table"),
    ],
)
def test_a_malformed_file_is_one_config_error_naming_file_and_table(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="^" + re.escape(message.format(path=path))):
        load_config_file(path)


def test_sole_hypervisor_table_is_chosen_without_hypervisor_name(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[hypervisor.dragonball]\nkernel = "{assets["vmlinuz"]}"\n')
    assert load_config_file(path).runtime.hypervisor_name == "dragonball"


def test_config_error_is_an_invalid_argument() -> None:
    # The service maps it to ttrpc InvalidArgument, and its message reaches ctr.
    assert issubclass(ConfigError, InvalidArgument)


_KEYS = {
    "runtime": ["name", "hypervisor_name", "agent_name", "enable_debug", "disable_new_netns", "other"],
    "hypervisor.dragonball": [
        "kernel",
        "initrd",
        "image",
        "default_vcpus",
        "default_maxvcpus",
        "default_memory",
    ],
    "agent.kata": ["dial_timeout_ms", "kernel_modules", "enable_debug", "request_timeout_ms"],
}
_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3).filter(lambda v: len({type(x) for x in v}) <= 1))


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    assert isinstance(value, list)
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_typed_garbage_is_one_config_error_or_a_config(tmp_path: Path, data: st.DataObject) -> None:
    lines = []
    for table, keys in _KEYS.items():
        if data.draw(st.booleans()):
            lines.append(f"[{table}]")
            for key in data.draw(st.lists(st.sampled_from(keys), unique=True)):
                lines.append(f"{key} = {_toml_value(data.draw(_values))}")
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        config = load_config_file(path)
    except ConfigError as err:
        assert str(err).startswith(f"{path}: ")
    else:
        assert config.hypervisor.kernel.is_file()


def test_factory_defaults_are_upstreams(tmp_path: Path, assets: dict[str, Path]) -> None:
    config = load_config_file(write_config(tmp_path / "c.toml", assets))
    assert config.factory == FactoryConfig(enable_template=False, template_path=Path("/run/vc/vm/template"))
    assert Path("/run/vc/vm/template") == DEFAULT_TEMPLATE_PATH


def test_factory_table_and_the_runtime_rs_nested_one_are_read(
    tmp_path: Path, assets: dict[str, Path]
) -> None:
    path = write_config(tmp_path / "c.toml", assets)
    path.write_text(
        path.read_text()
        + '\n[factory]\nenable_template = true\ntemplate_path = "/run/tpl"\nvm_cache_number = 2\n'
    )
    config = load_config_file(path)
    assert config.factory == FactoryConfig(enable_template=True, template_path=Path("/run/tpl"))
    assert "factory.vm_cache_number" in config.unused_keys  # upstream's VM cache: not built here
    nested = write_config(tmp_path / "n.toml", assets)
    nested.write_text(
        nested.read_text().replace(
            "[agent.kata]", '[hypervisor.dragonball.factory]\ntemplate_path = "/run/nested"\n\n[agent.kata]'
        )
        + "\n[factory]\nenable_template = true\n"
    )
    config = load_config_file(nested)
    assert config.factory == FactoryConfig(enable_template=True, template_path=Path("/run/nested"))
    assert not [k for k in config.unused_keys if "factory" in k]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("enable_template = 1", "factory.enable_template", "must be true or false"),
        ('enable_template = true\ntemplate_path = "rel/dir"', "factory.template_path", "absolute path"),
    ],
)
def test_bad_factory_values_name_the_key(
    tmp_path: Path, assets: dict[str, Path], text: str, key: str, problem: str
) -> None:
    path = write_config(tmp_path / "c.toml", assets)
    path.write_text(path.read_text() + f"\n[factory]\n{text}\n")
    with pytest.raises(ConfigError, match=f"{re.escape(str(path))}: {key}: .*{problem}"):
        load_config_file(path)


def test_a_template_on_an_external_vmm_is_refused_clearly(tmp_path: Path, assets: dict[str, Path]) -> None:
    path = tmp_path / "q.toml"
    path.write_text(
        f'[hypervisor.qemu]\npath = "/bin/true"\nkernel = "{assets["vmlinuz"]}"\n'
        f'image = "{assets["rootfs.img"]}"\n\n[agent.kata]\n\n[runtime]\nhypervisor_name = "qemu"\n'
        "\n[factory]\nenable_template = true\n"
    )
    with pytest.raises(
        ConfigError, match=r"factory\.enable_template: VM templates need the built-in VMM.*'qemu'"
    ):
        load_config_file(path)
    path.write_text(path.read_text().replace("enable_template = true", "enable_template = false"))
    assert load_config_file(path).factory.enable_template is False


@pytest.mark.parametrize(
    ("debug", "params", "expected"),
    [
        ("true", "quiet", "quiet agent.log=debug"),
        ("false", "quiet", "quiet"),
        ("true", "", "agent.log=debug"),
        ("true", "quiet agent.log=warn", "quiet agent.log=warn"),  # the admin's own level wins
    ],
)
def test_agent_enable_debug_asks_the_agent_for_debug_logs_on_the_kernel_cmdline(
    tmp_path: Path, assets: dict[str, Path], debug: str, params: str, expected: str
) -> None:
    path = write_config(tmp_path / "c.toml", assets)
    text = path.read_text().replace('kernel_params = "quiet"', f'kernel_params = "{params}"')
    path.write_text(text.replace("[agent.kata]\n", f"[agent.kata]\nenable_debug = {debug}\n"))
    config = load_config(str(path), env={})
    assert config.hypervisor.kernel_params == expected
    assert config.agent.enable_debug is (debug == "true")
