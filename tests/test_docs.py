"""Documentation stays true: the config reference matches the schema, presets load, README keys exist."""

import re
from pathlib import Path

import pytest

from sparserl import config

ROOT = Path(__file__).resolve().parent.parent


def test_config_reference_is_in_sync_with_schema():
    doc = (ROOT / "docs" / "config.md").read_text()
    assert config.reference_table() in doc, "regenerate docs/config.md with `sparserl inspect --keys`"


@pytest.mark.parametrize("preset", sorted(config.PRESET_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_presets_are_valid(preset):
    cfg = config.from_args(str(preset), [])
    assert cfg.env and cfg.critic.width > 0


def test_readme_config_keys_exist():
    keys = set(config.schema())
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Library")]
    mentioned = set(re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", table))
    unknown = {k for k in mentioned if "." in k or k in keys} - keys
    assert not unknown, unknown
