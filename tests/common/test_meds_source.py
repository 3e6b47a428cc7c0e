"""MEDS sites as data sources: ``kind: meds`` wherever a site file is read, the ``meds`` and
``synth-meds`` sources, the experiment's ``data.meds`` settings and the vocabulary it carries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fedmeta.common.config import load_config
from fedmeta.common.data.meds.config import MedsSiteConfig
from fedmeta.common.data.meds.source import (
    agreement_floor,
    own_vocabulary,
    shared_counts,
    synth_meds_root,
    with_vocabulary,
)
from fedmeta.common.data.meds.synth import write_synth_meds
from fedmeta.common.data.meds.vocabulary import Vocabulary
from fedmeta.common.data.registry import data_spec, load_site
from fedmeta.common.data.site_config import load_site_config
from fedmeta.common.errors import ConfigError

OUTCOMES = ("mortality", "los_gt_7d", "readmission_30d", "aki")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("meds-source")
    write_synth_meds(out, sites=2, seed=3, stays=60)
    return out


def test_kind_meds_is_a_site_file_like_the_others(consortium: Path) -> None:
    config = load_site_config(consortium / "hospital-01")
    assert isinstance(config, MedsSiteConfig) and config.outcomes == OUTCOMES
    assert config.path == consortium / "hospital-01" / "meds"
    bad = consortium.parent / "bad-site"
    bad.mkdir(exist_ok=True)
    (bad / "site.yaml").write_text("kind: meds\npath: meds\nlabels: {aki: a.parquet}\nschema: x\n")
    with pytest.raises(ConfigError, match=r"site.yaml: unknown key 'schema' for kind meds"):
        load_site_config(bad)
    (bad / "site.yaml").write_text("kind: mets\npath: x\n")
    with pytest.raises(ConfigError, match=r"kind = 'mets': expected 'ehr' .* or 'meds'"):
        load_site_config(bad)


def test_spec_before_and_after_the_agreement(consortium: Path) -> None:
    cfg = load_config(None, ["data.source=meds", f"data.path={consortium}"])
    spec = data_spec(cfg.data)
    assert spec.needs_agreement and spec.input_shape == (0,) and spec.features == ()
    assert spec.sites == ("hospital-01", "hospital-02") and spec.outcomes == OUTCOMES
    vocab = Vocabulary(codes=("LOINC//2160-0", "MEDS_BIRTH"), numeric_codes=("LOINC//2160-0",))
    agreed = with_vocabulary(cfg, vocab)
    assert agreed.data.meds.fingerprint == vocab.fingerprint()
    spec = data_spec(agreed.data)
    assert not spec.needs_agreement and spec.input_shape == (vocab.width,)
    assert spec.features == vocab.feature_names()
    site = load_site(agreed.data, "hospital-02")
    assert site.feature_names == vocab.feature_names() and site.outcomes == OUTCOMES
    with pytest.raises(ConfigError, match="data.meds.vocabulary is empty"):
        load_site(cfg.data, "hospital-02")
    # a site on its own (fedmeta site start's preflight: no experiment yet) uses its own codes
    from fedmeta.sitecore.data import load_local_site

    site_file = consortium / "hospital-02" / "site.yaml"
    own = own_vocabulary(load_site_config(site_file))
    assert load_local_site(site_file).feature_names == own.feature_names()
    assert load_local_site(site_file, data=agreed.data).feature_names == vocab.feature_names()
    # the experiment's outcomes pick and order the columns
    two = with_vocabulary(load_config(None, ["data.source=meds", f"data.path={consortium}",
                                             "data.outcomes=[aki, mortality]"]), vocab)
    assert load_site(two.data, "hospital-01").outcomes == ("aki", "mortality")


def test_bad_meds_source_settings_are_clear_errors(consortium: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.path is empty: data.source 'meds' needs the folder"):
        data_spec(load_config(None, ["data.source=meds"]).data)
    deployed = data_spec(load_config(None, ["data.source=meds", "data.outcomes=[aki]"]).data)
    assert deployed.sites == () and deployed.outcomes == ("aki",) and deployed.needs_agreement
    with pytest.raises(ConfigError, match="no label file for outcome"):
        data_spec(load_config(None, ["data.source=meds", f"data.path={consortium}",
                                     "data.outcomes=[sepsis]"]).data)
    mixed = tmp_path / "mixed"
    shutil.copytree(consortium / "hospital-01", mixed / "hospital-01")
    shutil.copytree(consortium / "flat" / "hospital-02", mixed / "hospital-02")
    shutil.copy(consortium / "flat" / "schema.yaml", mixed / "schema.yaml")
    with pytest.raises(ConfigError, match=r"kind = 'ehr', but data.source 'meds' needs every site"):
        data_spec(load_config(None, ["data.source=meds", f"data.path={mixed}"]).data)
    fewer = tmp_path / "fewer"
    shutil.copytree(consortium / "hospital-01", fewer / "hospital-01")
    shutil.copytree(consortium / "hospital-02", fewer / "hospital-02")
    doc = yaml.safe_load((fewer / "hospital-02" / "site.yaml").read_text())
    doc["labels"].pop("aki")
    (fewer / "hospital-02" / "site.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match=r"hospital-02/site.yaml: no label file for outcome\(s\) \['aki'\]"):
        data_spec(load_config(None, ["data.source=meds", f"data.path={fewer}"]).data)


@pytest.mark.parametrize(("setting", "message"), [
    ("data.meds.min_sites=0", "a number of sites must be >= 1"),
    ("data.meds.min_sites=1.5", "a fraction of the sites must be in (0, 1)"),
    ("data.meds.windows=[24h, 1d]", "windows repeat"),
    ("data.meds.aggregations.other=[mean]", "'mean' is not one of ['count', 'present']"),
    ("data.meds.fingerprint=abc", "a fingerprint without a vocabulary"),
    ("data.meds.vocabulary={codes: [b, a]}", "codes must be unique and sorted"),
])
def test_meds_settings_are_checked(setting: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [setting])
    assert message in str(err.value) and str(err.value).startswith("<overrides>: data.meds.")


def test_min_sites_as_a_count_or_a_fraction() -> None:
    assert load_config(None, []).data.meds.min_sites_of(10) == 2
    meds = load_config(None, ["data.meds.min_sites=0.75"]).data.meds
    assert [meds.min_sites_of(n) for n in (1, 4, 10)] == [1, 3, 8]


def test_k_is_the_site_files_raised_to_the_policy_floor(consortium: Path) -> None:
    site = load_site_config(consortium / "hospital-01")
    assert agreement_floor(site) == 20 and agreement_floor(site, 35) == 35
    assert agreement_floor(site.model_copy(update={"min_subjects": 50}), 35) == 50
    shared = shared_counts(site, policy_floor=35)
    assert shared.min_subjects == 35 and min(shared.codes.values()) >= 35


def test_synth_meds_is_generated_once_into_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDMETA_CACHE", str(tmp_path))
    calls: list[Path] = []
    import fedmeta.common.data.meds.synth as synth

    real = synth.write_synth_meds

    def small(out, *, sites, seed, **kw):  # type: ignore[no-untyped-def]
        calls.append(Path(out))
        return real(out, sites=sites, seed=seed, stays=40)

    monkeypatch.setattr(synth, "write_synth_meds", small)
    cfg = load_config(None, ["data.source=synth-meds", "data.synth_sites=2", "data.synth_seed=5"])
    spec = data_spec(cfg.data)
    assert spec.sites == ("hospital-01", "hospital-02") and spec.needs_agreement
    root = synth_meds_root(cfg.data)
    assert root.parent == tmp_path and root.name.endswith("-2sites-seed5") and len(calls) == 1
    assert (root / "flat" / "hospital-01" / "stays.parquet").is_file()  # the flat twin
    assert json.loads((root / "generator.json").read_text())["seed"] == 5
    data_spec(cfg.data)
    assert len(calls) == 1  # generated once
