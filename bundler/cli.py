"""The `bundle` command: build, inspect, verify. Thin commands over bundler's modules; one error
boundary in main()."""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import click

from runtime.host.gpu.registry import KEYS as GPU_KEYS
from runtime.host.gpu.registry import by_key
from runtime.errors import UsageError as SettingsError
from runtime.bundlefile import Manifest, ModelInfo, PayloadError, StubInfo, read_payload
from runtime import digest
from runtime.text import printable
from runtime.launch.settings import Settings
from runtime.prompts.template import PRESETS

from . import __version__
from .errors import BundleError, UsageError

TEMPLATE_CHOICES = ["auto", *PRESETS]


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def resolve_template(choice: str, gguf_template: str | None, info=None) -> tuple[str, str | None]:
    """--template value -> (name stored in the manifest, Jinja source). A GGUF without a template
    gets its family's preset (info: the GGUF's metadata), and a note says so."""
    from runtime.prompts.template import ChatTemplate, TemplateLimitError, fallback_preset
    from runtime.errors import TemplateError

    if choice == "auto" and not gguf_template:
        fallback = fallback_preset(info.architecture, info.get("tokenizer.ggml.pre"), info.get("tokenizer.ggml.model"),
                                   info.get("general.name")) if info is not None else "chatml"
        click.echo(f"note: the model carries no chat template: using the {fallback} preset (chosen by its "
                   f"family); --template sets another, --template none sends prompts as they are (base models)",
                   err=True)
        choice = fallback
    if choice == "auto":
        name, source = "auto", gguf_template
    elif choice in PRESETS:
        name, source = choice, PRESETS[choice][0]
    elif choice.endswith((".jinja", ".j2", ".jinja2")) or os.path.sep in choice:
        path = Path(choice)
        try:
            source = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BundleError(f"template file {choice} does not exist; check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise BundleError(f"cannot read template file {choice}: {exc}") from None
        name = f"file:{path.name}"
    else:
        raise BundleError(
            f"unknown template {choice!r}; choose one of {', '.join(TEMPLATE_CHOICES)} or pass a .jinja file"
        )
    try:
        # A template that cannot render a small conversation within the runtime's limits would
        # fail (or hang, without them) on every launch: refuse it now (issue 8.7). Refusing the
        # conversation itself (raise_exception) is the template's right, not an error.
        ChatTemplate(source, name).render(TEST_CONVERSATION)
    except TemplateLimitError as exc:
        raise BundleError(f"{exc}; it cannot be used (fix the template or pick --template chatml)") from None
    except TemplateError as exc:
        if "refused the conversation" not in str(exc):
            raise BundleError(str(exc)) from None
    return name, source


TEST_CONVERSATION = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Hello"},
                     {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "How are you?"}]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bundle")
def cli():
    """Turn a GGUF model into one executable file."""


@cli.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(), help="where to write the bundle (default: dist/<model stem>)")
@click.option("--name", help="the bundle's display name (default: the output file name)")
@click.option("--template", default="auto", show_default=True,
              help=f"chat template: {'|'.join(TEMPLATE_CHOICES)} or a FILE.jinja")
@click.option("--system", help="default system prompt")
@click.option("--think", type=click.Choice(["auto", "on", "off"]),
              help="reasoning models: whether they think before answering by default (auto: as llama-server)")
@click.option("--ctx", type=int, help="default context length in tokens")
@click.option("--context-overflow", type=click.Choice(["truncate", "error"]),
              help="a chat longer than the context: leave out its oldest turns (truncate, the default) or stop")
@click.option("--temp", type=float, help="default temperature")
@click.option("--top-p", type=float, help="default top-p")
@click.option("--top-k", type=int, help="default top-k")
@click.option("--repeat-penalty", type=float, help="default repeat penalty")
@click.option("--max-tokens", type=int, help="default most tokens per answer (-1: no limit)")
@click.option("--target", help="platform of the executable (default: this one; universal: one file for "
              "Windows x86-64 and every Linux whose stub is built)")
@click.option("--stub", type=click.Path(), help="use this runtime stub instead of stubs/<target>/")
@click.option("--gpu", type=click.Choice(["auto", *GPU_KEYS, "none"]), default="auto", show_default=True,
              help="the GPU back ends to carry (auto: every one the stub has; none: CPU only)")
@click.option("--split", is_flag=True,
              help="write the model as parts beside the executable, each under 4 GiB (FAT32 USB sticks)")
@click.option("--max-file-size", help="split so that no file is larger than this (e.g. 4G, 2000M); implies --split")
@click.option("--lora", "loras", multiple=True, metavar="[NAME=]ADAPTER.gguf[:SCALE]",
              help="pack a LoRA adapter, applied at SCALE (default 1) unless the user says otherwise (repeatable)")
@click.option("--base", metavar="BASE", help="with --lora and no MODEL: an adapter-only bundle for BASE (a bundle or "
              "a .gguf), which finds BASE beside it at launch")
@click.option("--force", is_flag=True, help="replace an existing file at the output path even if it is not a bundle")
def build(model, output, name, template, system, think, ctx, context_overflow, temp, top_p, top_k, repeat_penalty, max_tokens, target, stub,
          gpu, split, max_file_size, loras, base, force):
    """Build one executable from MODEL (a .gguf path or hf://owner/repo/file.gguf), or an
    adapter-only one: --lora ADAPTER.gguf --base BASE."""
    from . import gguf, hub, stubs, writer

    t0 = time.perf_counter()
    base_ref = None
    if model is None:
        if not base or not loras:
            raise UsageError("give a MODEL to bundle, or --lora ADAPTER.gguf --base BASE for an adapter-only bundle")
        if split or max_file_size:
            raise UsageError("an adapter-only bundle holds no model to split")
        base_ref, info = read_base(Path(base))
        model_path = None
    elif base:
        raise UsageError("--base makes an adapter-only bundle: give --lora and --base without a MODEL")
    else:
        model_path = hub.fetch(model) if hub.is_hub_ref(model) else Path(model)
        info = gguf.read_gguf(str(model_path))
    if info.get("general.type") == "adapter":
        raise BundleError(f"{model} is a LoRA adapter, not a model; pass the base model and the adapter with "
                          f"--lora: bundle build BASE.gguf --lora {model}")
    adapters = [read_adapter(spec, info) for spec in loras]
    if len({a[0].name for a in adapters}) != len(adapters):
        raise UsageError("two --lora adapters have the same name; name them: --lora NAME=ADAPTER.gguf")
    template_name, template_source = resolve_template(template, info.chat_template, info)
    stored = []
    if target == "universal":
        from . import universal

        if stub:
            raise UsageError("--stub names one runtime; a universal file takes every built stub from stubs/")
        stub_info, stored = stubs.find_universal_stubs()
    else:
        stub_info = stubs.find_stub(target, stub)
    for s in (stub_info, *stored):
        gguf.check_architecture(info, s.meta.get("architectures"), s.meta.get("llama_cpp_python", "?"))
    if name is not None and len(name) > gguf.MAX_NAME:
        raise BundleError(f"--name is {len(name)} characters long; give one of at most {gguf.MAX_NAME}")
    if model_path is None:
        stem = adapters[0][0].name
    else:
        stem = Path(model_path.name).stem if not hub.is_hub_ref(model) else Path(model.rsplit("/", 1)[-1]).stem
    out = Path(output) if output else Path("dist") / stub_info.spec.default_name(stem)
    named = stub_info.spec.executable_name(out.name)
    if named != out.name:
        if output:
            click.echo(f"note: {stub_info.spec.system.capitalize()} runs programs only by the name "
                       f"{stub_info.spec.exe_suffix}: writing {named}", err=True)
        out = out.with_name(named)
    if gpu in GPU_KEYS and not any(gpu in s.gpu for s in (stub_info, *stored)):
        b = by_key(gpu)
        raise BundleError(f"--gpu {gpu}: the stub in {stub_info.folder}/ has no {b.label} back end; build one with "
                          f"`python build.py {b.build_flag}` or pass --gpu none")
    carried = tuple(dict.fromkeys(b.key for s in (stub_info, *stored) for b in s.gpu_backends()
                                  if gpu in ("auto", b.key)))
    writer.check_output(out, model_path or Path(base), force)
    writer.check_space(out, model_path or adapters[0][1], stub_info, carried, stored)
    from . import split as splitter

    limit = splitter.parse_size(max_file_size) if max_file_size else (splitter.FAT32_MAX if split else None)
    exe_size = sum(s.exe.stat().st_size + s.native_cpu.stat().st_size + sum(
        s.gpu[key].stat().st_size for key in carried if key in s.gpu) for s in (stub_info, *stored))
    if limit is not None and exe_size + (1 << 20) > limit:
        raise UsageError(f"--max-file-size {_human(limit)} is smaller than the executable without its model "
                         f"({_human(exe_size)}); give a larger size")
    if model_path is None:
        exe_size += sum(path.stat().st_size for _, path in adapters)
    if limit is not None and exe_size + info.file_size <= limit:
        limit = None  # it fits in one file: nothing to split
        click.echo("note: the bundle fits in one file under the limit; not splitting", err=True)
    spec = stub_info.spec
    if spec.max_executable and limit is None and model_path is not None \
            and exe_size + info.file_size > spec.max_executable:
        limit = min(splitter.FAT32_MAX, spec.max_executable)
        most = spec.max_executable + 1
        click.echo(f"note: {spec.system.capitalize()} runs no executable over "
                   f"{f'{most >> 30} GiB' if most % (1 << 30) == 0 else _human(most)}: "
                   "the model goes beside it as parts", err=True)
    part_stem = out.name[:-len(spec.exe_suffix)] if spec.exe_suffix and out.name.lower().endswith(spec.exe_suffix) \
        else out.name
    if limit is not None:
        _check_part_targets(out.parent, part_stem, force)

    default_ctx = min(Settings.ctx, info.context_length) if info.context_length else Settings.ctx
    settings = Settings(ctx=default_ctx, template=template_name).merged(
        {"system": system, "think": think, "ctx": ctx, "temp": temp, "top_p": top_p, "top_k": top_k,
         "repeat_penalty": repeat_penalty, "max_tokens": max_tokens, "context_overflow": context_overflow},
        "bundle build",
    )
    summary = info.summary()
    summary["file"] = model_path.name if model_path is not None else base_ref.file
    if base_ref is not None:
        summary.update(digest.to_json(base_ref.digest))
    manifest = Manifest(
        name=name or part_stem,
        built=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        bundler_version=__version__,
        model=ModelInfo.from_json(summary),
        template_name=template_name,
        template=template_source,
        settings=settings.to_manifest(),
        stub=StubInfo.from_json(stub_info.manifest_info()),
        adapters=tuple(a for a, _ in adapters),
        base=base_ref,
    )
    err = click.get_text_stream("stderr")
    click.echo(
        f"{printable(manifest.name)}: {info.architecture}, {info.size_label} parameters, {info.quantization}, "
        f"trained context {info.context_length}, template {template_name}, {_human(info.file_size)}",
        err=True,
    )
    for a, path in adapters:
        click.echo(f"LoRA adapter {a.name}: {path.name}, rank {a.rank}, {a.tensors} tensors, scale {a.scale:g} "
                   f"({_human(a.size)})", err=True)
    for s in (stub_info, *stored):
        for b in s.gpu_backends():
            size = _human(s.gpu[b.key].stat().st_size)
            how = "--gpu none leaves it out" if b.key in carried else f"--gpu {b.key} or auto carries it"
            whose = f" for {s.target}" if stored else ""
            click.echo(f"{b.label} back end{whose}: {'carried' if b.key in carried else 'left out'} ({size}; {how})",
                       err=True)
    show_bar = err.isatty()
    parts = None
    try:
        with click.progressbar(length=info.file_size, label="writing", file=err, show_eta=True,
                               hidden=not show_bar) as bar:
            if limit is not None:
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise BundleError(f"cannot create the output folder {out.parent}: {exc.strerror}; "
                                      "choose another with -o") from None
                try:
                    parts = splitter.write_parts(model_path, info, out.parent, part_stem, limit, progress=bar.update)
                except OSError as exc:
                    raise BundleError(f"cannot write the model's parts in {out.parent}: {exc.strerror}; "
                                      "check the folder and free space") from None
            result = writer.write_bundle(model_path, stub_info, out, manifest, progress=bar.update,
                                         gpu=carried, parts=parts, stored=stored,
                                         adapters=[(a.name, path) for a, path in adapters])
    finally:
        for tmp, *_ in parts or ():
            tmp.unlink(missing_ok=True)  # renamed into place on success; leftovers of a failure
    seconds = time.perf_counter() - t0
    if base_ref is not None:
        click.echo(f"wrote {out} ({_human(result['size'])}, {stub_info.target}, an adapter for {base_ref.file}: "
                   f"it runs where that file, or its model, is beside it) in {seconds:.2f} s", err=True)
    elif stored:
        runs_on = universal.machines([s.target for s in (stub_info, *stored)])
        needs = "; ".join(f"{universal.SAYS[s.target]}: {s.spec.needs_text(s.meta)}" for s in (stub_info, *stored))
        click.echo(f"wrote {out} ({_human(result['size'])}, universal: runs on {runs_on}; needs {needs}) "
                   f"in {seconds:.2f} s", err=True)
    else:
        needs = spec.needs_text(stub_info.meta)
        click.echo(f"wrote {out} ({_human(result['size'])}, {stub_info.target}, needs {needs}) in {seconds:.2f} s",
                   err=True)
    if parts:
        from .split import is_part_file

        keep = {name for _, name, _, _ in parts}
        for old in out.parent.glob(f"{part_stem}-*-of-*.gguf"):
            if old.name not in keep and is_part_file(old):
                old.unlink()  # a part of this bundle's previous build, with another part count
        click.echo(f"and its model in {len(parts)} parts beside it (largest "
                   f"{_human(max(size for _, _, size, _ in parts))}); copy them together: "
                   + ", ".join(name for _, name, _, _ in parts), err=True)
    elif result["size"] > splitter.FAT32_MAX:
        click.echo(f"note: {out} is {_human(result['size'])}; FAT32 USB sticks hold no file over 4 GiB: "
                   "build with --split to write the model as parts beside it", err=True)
    shown = out if out.is_absolute() or str(out).startswith(".") or spec.system == "windows" else f"./{out}"
    import targets

    if stored:
        import shlex

        linux = shlex.quote(str(out) if out.is_absolute() or str(out).startswith(".") else f"./{out}")
        click.echo(f"run it on Windows: {out.name} -p \"Hello\" (or double-click it); on Linux, from a shell: "
                   f"{linux} -p \"Hello\"   or   sh {linux} --cli", err=True)
        return
    where = "" if spec.name == targets.host_name() else f" on {spec.system.capitalize()} {spec.machine}"
    click.echo(f"run it{where}: {shown} -p \"Hello\"   or   {shown} --cli", err=True)


def read_base(path: Path) -> tuple:
    """--base: (BaseRef, GGUFInfo) of a .gguf or of the model inside a bundle."""
    from runtime.bundlefile import MODEL_ENTRY
    from runtime.bundlefile.manifest import BaseRef

    from . import gguf

    if not path.is_file():
        raise BundleError(f"--base {path}: no such file; pass the base model's bundle or its .gguf")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        info = gguf.read_gguf(str(path))
        with open(path, "rb") as f:
            return BaseRef(path.name, info.file_size, digest.of_span(f, 0, info.file_size, digest.NEW)), info
    try:
        payload = read_payload(str(path))
    except PayloadError as exc:
        raise BundleError(f"--base {path}: {exc}") from None
    entry = payload.entries.get(MODEL_ENTRY)
    if entry is None:
        raise BundleError(f"--base {path} carries no model inside it (its model is beside it, or it is an adapter "
                          "itself); pass the base model's .gguf")
    info = gguf.read_gguf(str(path), payload.payload_start + entry.offset, entry.size)
    return BaseRef(path.name, entry.size, entry.digest), info


def read_adapter(spec: str, base) -> tuple:
    """--lora [NAME=]PATH[:SCALE] -> (Adapter, Path), checked against the base model."""
    import math
    import re

    from runtime.bundlefile.layout import LORA_NAME
    from runtime.bundlefile.manifest import MAX_SCALE, Adapter

    from . import gguf

    name, eq, rest = spec.partition("=")
    if not eq or os.sep in name or not LORA_NAME.fullmatch(name):
        name, rest = None, spec
    scale = 1.0
    m = re.fullmatch(r"(.+):([-+0-9.eE]+)", rest)
    if m and not Path(rest).exists():
        rest = m.group(1)
        try:
            scale = float(m.group(2))
        except ValueError:
            raise UsageError(f"--lora {spec}: {m.group(2)!r} is not a scale; give a number, e.g. :0.5") from None
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise UsageError(f"--lora {spec}: the scale must be a finite number of at most {MAX_SCALE:g}")
    path = Path(rest)
    if name is None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem)[:64].lstrip("._-") or "adapter"
    info = gguf.read_gguf(str(path))
    facts = gguf.check_adapter(info, base)
    return Adapter(name=name, scale=scale, alpha=facts["alpha"], rank=facts["rank"], tensors=facts["tensors"],
                   size=info.file_size), path


def _needs(stub: dict) -> str:
    """What a bundle's machine must have, from its stub record (an unknown target: what is recorded)."""
    import targets

    spec = targets.TARGETS.get(stub.get("target") or "")
    if spec is None:
        return ", ".join(f"{k} {stub[k]}" for k in ("glibc_min", "windows_min") if stub.get(k)) or "?"
    return spec.needs_text(stub)


def _check_part_targets(folder: Path, stem: str, force: bool) -> None:
    """Part files of a previous split build may be replaced; anything else only with --force."""
    from .split import is_part_file

    if not folder.is_dir():
        return
    for path in folder.glob(f"{stem}-*-of-*.gguf"):
        if not force and not is_part_file(path):
            raise BundleError(f"{path} exists and is not a model part; move it or pass --force to replace it")


@cli.command()
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def inspect(path, as_json):
    """Describe a .gguf model or a bundle."""
    data = describe(path)
    if as_json:
        click.echo(json.dumps(data, indent=2))  # ASCII: escape codes from the file stay escaped
    else:
        click.echo(format_description(data))


def describe(path: str) -> dict:
    from . import gguf

    p = Path(path)
    if p.is_dir():
        raise BundleError(f"{path} is a directory; pass a .gguf file or a bundle")
    if not p.exists():
        raise BundleError(f"{path} does not exist; check the path")
    if not p.is_file():  # a FIFO would block for ever, a device never end
        raise BundleError(f"{path} is not a regular file (a pipe or a device); pass a .gguf file or a bundle")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        info = gguf.read_gguf(path)
        meta = {k: v for k, v in info.metadata.items() if not isinstance(v, dict) and k != "tokenizer.chat_template"}
        return {"kind": "gguf", "path": path, "model": info.summary(), "template": info.chat_template, "metadata": meta}
    payload = read_payload(path)
    m = payload.manifest
    return {
        "kind": "bundle",
        "path": path,
        "format_version": payload.version,
        "file_size": payload.file_size,
        "name": m.name,
        "built": m.built,
        "model": m.model.to_json(),
        "template_name": m.template_name,
        "template": m.template,
        "settings": m.settings,
        "stub": m.stub.to_json(),
        "runtimes": {t: stub.to_json() for t, stub in m.runtimes.items()},
        "runs_on": m.targets(),
        "adapters": [a.to_json() for a in m.adapters],
        "regions": [r.to_json() for r in payload.regions.values()],
        "entries": [
            {"name": e.name, "offset": payload.payload_start + e.offset, "size": e.size,
             "compression": e.compression, **digest.to_json(e.digest)}
            for e in payload.entries.values()
        ],
    }


def format_description(d: dict) -> str:
    from runtime.text import printable_tree

    d = printable_tree(d)  # names, templates and paths from a file: no terminal escapes
    m = d["model"]
    lines = []
    if d["kind"] == "bundle":
        lines.append(f"bundle:      {d['path']} ({_human(d['file_size'])}, format {d['format_version']})")
        lines.append(f"name:        {d['name']} (built {d['built']})")
    else:
        lines.append(f"gguf:        {d['path']} ({_human(m['file_size'])}, GGUF v{m['gguf_version']})")
    lines.append(
        f"model:       {m.get('name')} · {m.get('architecture')} · {m.get('size_label')} · {m.get('quantization')}"
        f" · trained context {m.get('context_length')}"
    )
    if d["kind"] == "bundle":
        s = d["settings"]
        lines.append(f"template:    {d['template_name']}")
        lines.append("settings:    " + ", ".join(f"{k}={v}" for k, v in s.items()))
        st = d["stub"]
        lines.append(
            f"stub:        {st.get('target')} · runtime {st.get('runtime_version')} · llama-cpp-python "
            f"{st.get('llama_cpp_python')} · needs {_needs(st)}"
        )
        for target, other in (d.get("runtimes") or {}).items():
            lines.append(f"stub:        {target} · runtime {other.get('runtime_version')} · llama-cpp-python "
                         f"{other.get('llama_cpp_python')} · needs {_needs(other)}")
        if len(d.get("runs_on") or ()) > 1:
            from .universal import machines

            lines.append(f"runs on:     {machines(d['runs_on'])} (one file: on Linux, run it from a shell)")
        if d.get("adapters"):
            lines.append("adapters:    " + ", ".join(f"{a['name']} (scale {a['scale']:g}, rank {a.get('rank')})"
                                                    for a in d["adapters"]))
        lines.append("entries:")
        for e in d["entries"]:
            lines.append(
                f"  {e['name']:<34} {_human(e['size']):>10}  at {e['offset']:<10} {e['compression']:<5} {_digest_text(e)}"
            )
        parts = (d.get("model") or {}).get("parts") or []
        if parts:
            lines.append("model parts (beside the executable; copy them with it):")
            for part in parts:
                lines.append(f"  {printable(part['file']):<34} {_human(part['size']):>10}  {_digest_text(part)}")
        if d.get("regions"):
            lines.append("runtime (hashed too):")
            for r in d["regions"]:
                lines.append(f"  {r['name']:<34} {_human(r['size']):>10}  at {r['offset']:<10}       {_digest_text(r)}")
    else:
        lines.append(f"template:    {'embedded Jinja template' if d['template'] else 'none (ChatML will be used)'}")
    return "\n".join(lines)


def _digest_text(item: dict) -> str:
    """'blake3 HEX' or 'sha256 HEX' of a part as its JSON has it."""
    return next((f"{a} {item[a]}" for a in digest.ALGORITHMS if a in item), "")


@cli.command()
@click.argument("bundle", type=click.Path())
def verify(bundle):
    """Recompute every hash in BUNDLE; exit 0 when intact, 1 with what is wrong."""
    payload = read_payload(bundle)
    total = sum(e.size for e in payload.entries.values()) + sum(r.size for r in payload.regions.values())
    err = click.get_text_stream("stderr")
    with click.progressbar(length=total, label="verifying", file=err, hidden=not err.isatty()) as bar:
        problems = payload.verify(progress=bar.update)
    if problems:
        for p in problems:
            click.echo(f"damaged: {p}", err=True)
        raise BundleError(f"{bundle} is damaged ({len(problems)} problem(s) above); build or copy it again")
    click.echo(f"ok: {bundle} is intact ({len(payload.entries)} entries, {_human(payload.file_size)})")


def main(argv=None) -> int:
    from runtime.host.process import ensure_std_streams
    from runtime.launch.settings import env_flag

    ensure_std_streams()
    try:
        debug = env_flag("BUNDLE_DEBUG")
    except SettingsError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    try:
        cli.main(args=argv, prog_name="bundle", standalone_mode=False)
        return 0
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 1
    except click.exceptions.UsageError as exc:
        exc.show()
        return 2
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except (UsageError, SettingsError) as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    except (BundleError, PayloadError) as exc:
        if debug:
            raise
        click.echo(f"error: {printable(exc)}", err=True)
        return 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:
        if debug:
            raise
        click.echo(f"error: unexpected {type(exc).__name__}: {exc}; run again with BUNDLE_DEBUG=1 and report it", err=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
