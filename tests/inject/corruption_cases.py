"""What tests/inject/test_corruption.py damages, and how each damaged save must load (see corruption.py): an ak.save
folder ("ak": a LoRA on query/value with the classifier), our export_peft folder ("peft_ours": a DoRA with the
classifier), peft's own save_pretrained ("peft_theirs": a LoRA with rank_pattern, alpha_pattern and the classifier),
and a training checkpoint ("ckpt"). ``<subject>-new`` (and ``peft_ours-same``, the same config with other weights)
are the newer saves a killed save was writing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from adapterkit.train.checkpoint import DIGEST, FORMAT_VERSION, KEY, header_digest
from tests.inject.corruption import Apply, file_of, generic, json_edit, killed, setter, st_edit, wrong_types

T0, T1 = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"
P = "base_model.model."


def _weights_elsewhere(where: str) -> Apply:
    """The record names a file outside its folder, where a valid copy (right sha256) lies: following it would load."""
    def apply(folder: Path, pristine: Path) -> str:
        name = file_of(pristine, "ak", "weights").name
        (folder.parent / "elsewhere").mkdir(exist_ok=True)
        shutil.copy(pristine / name, folder.parent / "elsewhere" / name)
        (folder / "sub").mkdir()
        shutil.copy(pristine / name, folder / "sub" / name)
        target = where.format(name, abs=str(folder.parent / "elsewhere" / name))
        return json_edit("ak", "record", lambda r: r.update(weights=target), "error")(folder, pristine)
    return apply


def ak_cases() -> list[tuple[str, Apply]]:
    cases = generic("ak", "record") + generic("ak", "weights")
    cases += wrong_types("ak-record", lambda e, o: json_edit("ak", "record", e, o), {
        ("format_version",): 1, ("name",): "a", ("spec",): {}, ("targets",): [], ("modules",): [], ("fingerprint",): {},
        ("weights",): "w", ("weights_sha256",): "s", ("spec", "method"): "lora", ("spec", "r"): 2,
        ("spec", "alpha"): 1.0, ("spec", "scaling"): "lora", ("fingerprint", T0): {}, ("fingerprint", T0, "shapes"): {},
        ("fingerprint", T0, "other"): {}, ("targets", 0): "t", ("modules", 0): "m"},
        missing={("modules",): "load:any", ("spec", "alpha"): "load", ("spec", "scaling"): "load",
                 ("targets", 0): "load:any", ("modules", 0): "load:any", ("fingerprint", T0, "other"): "either"})
    def fp(record: dict) -> dict:
        return record["fingerprint"][T0]

    edit = [("extra-key", lambda r: r.update(future=1), "load"),
            ("spec-extra-key", lambda r: r["spec"].update(future=1), "load"),
            ("fingerprint-extra-key", lambda r: fp(r).update(future=1), "load"),
            ("method-unknown", lambda r: r["spec"].update(method="lorra"), "error"),
            ("method-other", lambda r: r["spec"].update(method="ia3"), "error"),
            ("rank-disagrees", lambda r: r["spec"].update(r=3), "error"),
            ("rank-too-large", lambda r: r["spec"].update(r=64), "error"),
            ("rank-negative", lambda r: r["spec"].update(r=-1), "error"),
            ("alpha-zero", lambda r: r["spec"].update(alpha=0), "error"),
            ("targets-empty", lambda r: r.update(targets=[]), "error"),
            ("targets-repeat", lambda r: r.update(targets=[T0, T0]), "error"),
            ("target-absent", lambda r: (r["targets"].append("bert.nowhere"),
                                         r["fingerprint"].update({"bert.nowhere": fp(r)}))[0], "error"),
            ("module-absent", lambda r: r.update(modules=["nowhere"]), "error"),
            ("fingerprint-no-target", lambda r: r["fingerprint"].pop(T1) and None, "error"),
            ("shapes-disagree", lambda r: fp(r)["shapes"].update(weight=[33, 32]), "error"),
            ("samples-not-base64", lambda r: fp(r)["samples"].update(weight="!!"), "error"),
            ("samples-other-weights", lambda r: fp(r)["samples"].update(
                weight=r["fingerprint"][T1]["samples"]["weight"]), "error"),
            ("version-zero", lambda r: r.update(format_version=0), "error"),
            ("version-newer", lambda r: r.update(format_version=99), "error"),
            ("version-float", lambda r: r.update(format_version=1.0), "error"),
            ("name-invalid", lambda r: r.update(name="1 bad"), "error"),
            ("sha-zeros", lambda r: r.update(weights_sha256="0" * 64), "error"),
            ("sha-upper", lambda r: r.update(weights_sha256=r["weights_sha256"].upper()), "error")]
    cases += [(f"ak-record-{n}", json_edit("ak", "record", e, o)) for n, e, o in edit]
    cases += [(f"ak-record-weights={w}", _weights_elsewhere(w)) for w in (
        "../elsewhere/{}", "{abs}", "sub/{}", "..", ".", "", "adapter.json", "nowhere.safetensors")]
    tensor = [("shape-disagrees", lambda t: t.update({f"adapter.{T0}.lora_a": torch.zeros(3, 32)}), "error"),
              ("lora-b-missing", lambda t: t.pop(f"adapter.{T1}.lora_b"), "error"),
              ("head-missing", lambda t: t.pop("module.classifier.bias"), "error"),
              ("head-shape", lambda t: t.update({"module.classifier.bias": torch.zeros(4)}), "error"),
              ("extra-tensor", lambda t: t.update({"adapter.bert.x.y": torch.zeros(1)}), "load"),
              ("no-tensors", lambda t: t.clear(), "error"),
              ("not-safetensors", lambda t: b"not a safetensors file", "error")]
    cases += [(f"ak-weights-{n}", st_edit("ak", "weights", e, o, meta=lambda m, t: None)) for n, e, o in tensor]

    def new_weights(folder: Path, new: Path) -> None:
        shutil.copy(file_of(new, "ak", "weights"), folder)

    def half(src: Path, dst: Path) -> None:
        dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])

    return cases + [
        ("ak-killed-before-record", killed("ak", new_weights, "load")),
        ("ak-killed-before-cleanup", killed("ak", lambda f, new: (new_weights(f, new), shutil.copy(
            new / "adapter.json", f)) and None, "load:new")),
        ("ak-killed-writing-weights", killed("ak", lambda f, new: half(
            file_of(new, "ak", "weights"), f / f".{file_of(new, 'ak', 'weights').name}.k1.tmp"), "load")),
        ("ak-killed-writing-record", killed("ak", lambda f, new: (new_weights(f, new), half(
            new / "adapter.json", f / ".adapter.json.k2.tmp")) and None, "load"))]


def peft_cases(subject: str) -> list[tuple[str, Apply]]:
    ours = subject == "peft_ours"

    def checked(otherwise: str) -> str:  # our exports guard the config values that change the outputs
        return "error" if ours else otherwise

    cases = generic(subject, "config") + generic(subject, "weights")
    nullable = (("lora_dropout",), ("use_rslora",), ("use_dora",), ("rank_pattern",), ("alpha_pattern",))
    cases += wrong_types(f"{subject}-config", lambda e, o: json_edit(subject, "config", e, o), {
        ("peft_type",): "LORA", ("r",): 2, ("lora_alpha",): 4, ("lora_dropout",): 0.0, ("use_rslora",): False,
        ("use_dora",): False, ("rank_pattern",): {}, ("alpha_pattern",): {}},
        missing={("lora_dropout",): "load", ("use_rslora",): checked("load"), ("use_dora",): checked("load"),
                 ("alpha_pattern",): checked("load:any")}, skip=nullable)
    edit = [("extra-key", lambda c: c.update(future=1), "load"),
            ("targets-missing", setter(("target_modules",), KeyError), "load"),
            ("peft-type-ia3", lambda c: c.update(peft_type="IA3"), "error"),
            ("rank-zero", lambda c: c.update(r=0), "error"), ("rank-disagrees", lambda c: c.update(r=3), "error"),
            ("alpha-zero", lambda c: c.update(lora_alpha=0), "error"),
            ("dropout-one", lambda c: c.update(lora_dropout=1.0), "error"),
            ("pattern-rank-disagrees", lambda c: c.update(rank_pattern={"query": 5}), "error"),
            ("pattern-bad-regex", lambda c: c.update(rank_pattern={"(": 2}), "error"),
            ("pattern-alpha-str", lambda c: c.update(alpha_pattern={"query": "x"}), "error"),
            ("pattern-alpha-other", lambda c: c.update(alpha_pattern={"query": 9}), checked("load:any")),
            ("lora-bias", lambda c: c.update(lora_bias=True), "error"),
            ("dora-flipped", lambda c: c.update(use_dora=not c.get("use_dora")), "error")]
    cases += [(f"{subject}-config-{n}", json_edit(subject, "config", e, o)) for n, e, o in edit]
    a, b = f"{P}{T0}.lora_A.weight", f"{P}{T1}.lora_B.weight"
    tensor = [("unchanged-no-checksum", lambda t: None, "load"), ("lora-b-missing", lambda t: t.pop(b), "error"),
              ("rank-disagrees", lambda t: t.update({a: torch.zeros(5, 32)}), "error"),
              ("no-prefix", lambda t: t.update({"x.lora_A.weight": t.pop(a)}), "error"),
              ("module-absent", lambda t: t.update({f"{P}bert.nowhere.lora_A.weight": t[a].clone()}), "error"),
              ("param-absent", lambda t: t.update({f"{P}classifier.nothing": torch.zeros(3)}), "error"),
              ("head-shape", lambda t: t.update({f"{P}classifier.bias": torch.zeros(4)}), "error"),
              ("nan", lambda t: t[a].view(-1).__setitem__(0, float("nan")), "error"),
              ("int-dtype", lambda t: t.update({a: t[a].to(torch.int32)}), "error"),
              ("no-tensors", lambda t: t.clear(), "error")]
    if ours:
        tensor.append(("magnitude-missing", lambda t: t.pop(f"{P}{T0}.lora_magnitude_vector"), "error"))
    cases += [(f"{subject}-weights-{n}", st_edit(subject, "weights", e, o)) for n, e, o in tensor]
    cases.append((f"{subject}-pickle-only", lambda f, _: (file_of(f, subject, "weights").rename(
        f / "adapter_model.bin"), "error")[1]))
    if not ours:
        return cases

    def weights(folder: Path, new: Path) -> None:
        shutil.copy(new / "adapter_model.safetensors", folder)

    return cases + [
        ("peft_ours-killed-between-files", killed(subject, weights, "error")),  # detected: the old save is gone
        ("peft_ours-killed-between-files-same-config", killed(subject, lambda f, new: weights(
            f, new.parent / "peft_ours-same"), "load:same")),
        ("peft_ours-killed-writing", killed(subject, lambda f, new: (f / ".adapter_model.safetensors.k.tmp")
                                            .write_bytes(b"\x10" * 100) and None, "load"))]


def meta_edit(meta: dict[str, str], tensors: dict[str, torch.Tensor], edit: Any = None) -> dict[str, str]:
    """The checkpoint header with its JSON edited and re-signed, as a buggy writer would leave it."""
    data = json.loads(meta[KEY])
    if edit is not None:
        edit(data)
    text = json.dumps(data)
    return {KEY: text, DIGEST: header_digest(text, tensors)}


def ckpt_cases() -> list[tuple[str, Apply]]:
    def meta(make: Any, outcome: str) -> Apply:
        return st_edit("ckpt", "checkpoint", lambda t: None, outcome, meta=make)

    cases = generic("ckpt", "checkpoint")
    def signed(edit: Any) -> Any:
        return lambda header, tensors: meta_edit(header, tensors, edit)

    cases += wrong_types("ckpt-meta", lambda e, o: meta(signed(e), o), {
        ("format_version",): 1, ("progress",): {}, ("param_groups",): [], ("optimizer_scalars",): {},
        ("scheduler",): {}, ("cuda_rng_devices",): 0, ("progress", "step"): 1, ("progress", "seconds"): 0.5,
        ("progress", "history"): {}, ("progress", "history", "loss"): [], ("param_groups", 0): {},
        ("param_groups", 0, "lr"): 0.1, ("param_groups", 0, "betas"): [], ("scheduler", "last_epoch"): 1},
        missing={("cuda_rng_devices",): "load"})

    def version_1(header: dict[str, str], tensors: dict[str, torch.Tensor]) -> dict[str, str]:
        """What adapterkit wrote before checkpoints carried a digest."""
        return {KEY: json.dumps({**json.loads(header[KEY]), "format_version": 1})}

    cases += [(f"ckpt-meta-{n}", meta(e, o)) for n, e, o in [
        ("version-1-no-digest", version_1, "load"), ("no-digest", lambda m, t: {KEY: m[KEY]}, "error"),
        ("digest-wrong", lambda m, t: {**m, DIGEST: "0" * 64}, "error"), ("resigned", meta_edit, "load"),
        ("no-metadata", lambda m, t: None, "error"), ("not-json", lambda m, t: {KEY: "{"}, "error"),
        ("list", lambda m, t: {KEY: "[]"}, "error"),
        ("newer", signed(lambda d: d.update(format_version=FORMAT_VERSION + 1)), "error"),
        ("cuda-states-absent", signed(lambda d: d.update(cuda_rng_devices=2)), "error"),
        ("groups-fewer-params", signed(lambda d: d["param_groups"][0].update(params=[0])), "error"),
        ("groups-repeat-params", signed(lambda d: d["param_groups"][0].update(params=[0, 0])), "error"),
        ("scalars-stray", signed(lambda d: d.update(optimizer_scalars={"9": {"x": 1}})), "error"),
        ("history-numbers", signed(lambda d: d["progress"]["history"].update(loss=["x"])), "error"),
        ("scheduler-extra", signed(lambda d: d["scheduler"].update(optimizer=1)), "error")]]
    tensor = [("param-shape", lambda t: t.update({"param.3.bias": torch.zeros(3)})),
              ("param-missing", lambda t: t.pop("param.3.weight")),
              ("param-extra", lambda t: t.update({"param.0.weight": torch.zeros(8, 4)})),
              ("opt-shape", lambda t: t.update({"opt.0.exp_avg": torch.zeros(3)})),
              ("opt-stray", lambda t: t.update({"opt.9.exp_avg": torch.zeros(3)})),
              ("rng-missing", lambda t: t.pop("rng.torch")),
              ("rng-short", lambda t: t.update({"rng.torch": t["rng.torch"][:100].clone()})),
              ("rng-data-float", lambda t: t.update({"rng.data": t["rng.data"].float()}))]
    cases += [(f"ckpt-tensor-{n}", st_edit("ckpt", "checkpoint", e, "error", meta=meta_edit)) for n, e in tensor]

    def file(folder: Path) -> Path:
        return folder / "checkpoint.safetensors"

    return cases + [
        ("ckpt-killed-writing", killed("ckpt", lambda f, new: (f / ".checkpoint.safetensors.k.tmp").write_bytes(
            file(new).read_bytes()[:1000]) and None, "load")),
        ("ckpt-killed-after-rename", killed("ckpt", lambda f, new: shutil.copy(file(new), file(f)) and None,
                                            "load:new"))]


CASES = dict(ak_cases() + peft_cases("peft_ours") + peft_cases("peft_theirs") + ckpt_cases())
