"""What a launch has found and loaded (Runtime): the bundle file opened once, its payload and
settings, the first-launch check, the libraries, the back end, the model, the template."""

from __future__ import annotations

import os
import sys
import time

from .. import __version__, digest
from ..bundlefile import MODEL_ENTRY, NATIVE_CPU_ENTRY, read_payload
from ..bundlefile.layout import lora_entry
from ..errors import RuntimeFailure, UsageError
from ..host.console import say
from ..host.cpu import hardware, runtime_target
from ..prompts.template import load_template
from ..text import printable
from .cli import adapter_scales, open_once, read_schema
from .settings import Settings, env_flag, resolve

class Runtime:
    """What a launch has found and loaded: payload, settings, libraries, model."""

    def __init__(self, path: str, args):
        from ..host.cpu import BusyMeter

        self.busy = BusyMeter()  # read when the thread count is chosen, after the launch's own work
        self.path = path
        self.args = args
        # Opened once: checked, unpacked from and mapped through this one descriptor, so a file
        # renamed over the bundle during the launch is never what runs (issue 22.3).
        self.source = open_once(path)
        self.payload = read_payload(path, self.source)
        self.targets = self.payload.manifest.targets()  # what the file runs on (several: universal)
        target = runtime_target()
        if self.payload.manifest.runtimes and target not in self.targets:
            raise RuntimeFailure(f"{printable(path)} carries no runtime for {target}; it runs on "
                                 + ", ".join(self.targets))
        self.payload = self.payload.for_runtime(target)  # a universal file: this runtime's own parts
        self.manifest = self.payload.manifest
        flags = {k: getattr(args, k, None) for k in Settings.field_names()}
        self.settings = resolve(self.manifest.settings, flags)
        # LoRA adapters packed in the bundle, by name: the scale each applies at
        self.adapter_scales = adapter_scales(self.manifest.adapters, getattr(args, "lora", None),
                                             bool(getattr(args, "no_lora", False)))
        self.verbose = bool(args.verbose) or env_flag("BUNDLE_VERBOSE")
        self.cache = None
        self.check = None
        self.n_seq = 1  # conversations the engine holds at once (load_model)
        self.base_path = None  # an adapter-only bundle: the file its base model is read from
        self.libdir = None
        self.C = None
        self.engine = None
        self.variant = None
        self.backend = None
        self.workers = None  # --rpc: the other machines the model runs across (runtime/host/rpc.py)
        self.split = None  # their plan: layers per device, tensor_split
        self.on_worker_lost = None  # the server's: end the requests, stay up; else one line and exit 1

    def threads(self) -> int:
        if getattr(self, "_threads", None) is None:
            self._threads = self._choose_threads()
        return self._threads

    def _choose_threads(self) -> int:
        from ..host.cpu import physical_cores, usable_cpus

        wanted = self.settings.threads or physical_cores()
        limit = usable_cpus()
        if wanted > limit:
            # More threads than CPUs only slows llama.cpp down (and 10^5 of them crash it).
            say(f"note: {wanted} threads capped at {limit}, the CPUs this process may use")
            return limit
        if not self.settings.threads:
            # ggml's own thread pool (the portable build has no OpenMP) spins at its barriers:
            # when a thread competes with other busy programs for a core, decoding collapses
            # (measured: 2 threads beside 2 busy programs on 2 cores, next to nothing; 1 thread,
            # 15 tok/s). So the default leaves the cores other programs are using right now.
            free = max(1, limit - self.busy.busy_cpus())
            if free < wanted:
                say(f"note: {free} thread{'s' if free > 1 else ''}: other programs are using {limit - free} of the "
                    f"{limit} CPUs now (-t sets the count)")
                return free
        return wanted

    def check_payload(self) -> None:
        """First launch on this machine: hash what is about to be used (runtime/bundlefile/checks.py)."""
        from ..bundlefile import checks
        from ..host import libraries

        if self.check is None:
            if self.manifest.model.parts:
                self.payload.find_model_parts()  # a missing part is named before any hashing
            self.cache = libraries.usable_cache_root()
            self.check = checks.check_once(self.payload, self.cache, say=say)
            pause = os.environ.get("_BUNDLE_TEST_PAUSE_AFTER_CHECK")
            if pause:  # for the test that swaps the file between the check and the load
                say("test hook: paused after the check")
                time.sleep(float(pause))

    def load_libraries(self) -> None:
        from ..host import libraries
        from ..host import bindings
        from ..host.bindings import import_bindings, set_logging

        t0 = time.perf_counter()
        self.check_payload()
        self.libdir = libraries.extract_entry(self.payload, NATIVE_CPU_ENTRY, root=self.cache, say=say)
        # libllama first (it loads libggml.so.0 by soname), then silence, then the back ends.
        self.C = import_bindings(self.libdir)
        set_logging(self.C, self.verbose)
        bindings.load_backends(self.libdir, os.environ.get("BUNDLE_CPU_VARIANT") or None)
        self.variant = bindings.loaded_cpu_variant()
        self.choose_backend()
        if getattr(self.args, "rpc", None):
            self.connect_workers()
        self.libs_seconds = time.perf_counter() - t0

    def choose_backend(self) -> None:
        from ..host.gpu import choice
        from ..host.bindings import last_error

        import dataclasses

        layout = self.manifest.model.layout
        # The GPU must hold every slot's KV cache: plan for ctx times the slots.
        planned = dataclasses.replace(self.settings, ctx=self.settings.ctx * self.n_seq)
        self.backend = choice.choose(self.payload, planned, self.libdir,
                                      layout.to_json() if layout else None, say=say, last_log=last_error)
        if self.backend.name == "CPU" and self.backend.skipped:
            say(f"running on the CPU: {self.backend.reason}")
        if self.backend.note:
            say(f"note: {self.backend.note}")

    def rpc_library(self):
        from ..host import rpc
        from ..host.bindings import GGML_LIB

        protocol = self.manifest.stub.needs("rpc").get("protocol")
        lib = rpc.Library(self.libdir, GGML_LIB)
        if not protocol:
            raise RuntimeFailure("this bundle does not record its RPC protocol version; rebuild it with a current stub")
        return lib, tuple(protocol)

    def connect_workers(self) -> None:
        """--rpc: link to every worker (handshake first), then plan the layers across this
        machine and them: by free memory, or --tensor-split."""
        from ..host import rpc

        lib, protocol = self.rpc_library()
        key = rpc.key_from(getattr(self.args, "rpc_key", None))
        addresses = [a for a in self.args.rpc.split(",") if a.strip()]
        if not addresses:
            raise UsageError("--rpc takes HOST:PORT[,HOST:PORT...]")
        split = rpc.parse_split(getattr(self.args, "tensor_split", None))
        layout = self.manifest.model.layout
        if layout is None:
            raise RuntimeFailure("this bundle does not record its model's layers, so they cannot be spread; rebuild it")
        self.workers = rpc.Workers(lib, addresses, key, protocol, self._worker_lost)
        self.workers.connect()
        local = list(self.backend.devices or [])
        local_free = [lib.memory(d)[0] for d in local]
        cpu_free = lib.memory(lib.cpu_device())[0]
        gpu_layers, shares, per_device, cpu_layers = rpc.plan_layers(
            layout.n_layer, cpu_free, local, local_free, self.workers.workers, split)
        at = len(local)
        for w in self.workers.workers:
            w.layers = sum(per_device[at:at + len(w.devices)])
            at += len(w.devices)
        self.split = {"shares": shares, "local_layers": (sum(per_device[:len(local)]) if local else cpu_layers),
                      "local_device": self.backend.device or "CPU"}
        self.backend.devices = local + self.workers.all_devices()
        self.backend.gpu_layers = gpu_layers

    def _worker_lost(self, message: str) -> None:
        if self.on_worker_lost is not None:
            self.on_worker_lost(message)
            return
        try:
            sys.stdout.flush()  # what was answered so far
        except (OSError, ValueError):
            pass
        say(f"\nerror: {message}; the model cannot run without it: start the worker again, then this")
        os._exit(1)  # the engine's thread waits inside ggml for a reply that will never come

    def rpc_info(self) -> dict | None:
        if self.workers is None:
            return None
        return {
            "machines": 1 + len(self.workers.workers),
            "local": {"device": self.split["local_device"], "layers": self.split["local_layers"]},
            "workers": [{"address": w.address, "layers": w.layers,
                         "devices": [{"free": f, "total": t} for f, t in w.memory]} for w in self.workers.workers],
            "tensor_split": self.split["shares"],
            "lost": self.workers.lost,
        }

    KV_BUDGET = 1 << 30  # the KV caches of all slots together, when --parallel is not given

    def parallel(self) -> int:
        """Slots of the server: --parallel, else 4 (llama-server's default) when their KV caches
        (one per slot, each of the full context) fit in KV_BUDGET, fewer otherwise: 4 for the
        demo model at ctx 4096 (90 MiB each), 2 for an 8B GQA model, 1 for a 7B without GQA."""
        if self.settings.parallel:
            return self.settings.parallel
        layout = self.manifest.model.layout
        if layout is None:
            return 1
        from ..host.gpu.nvidia import kv_bytes_per_layer

        per_slot = kv_bytes_per_layer(layout.to_json(), self.settings.ctx) * layout.n_layer
        return max(1, min(4, self.KV_BUDGET // max(1, per_slot)))

    def load_model(self, n_seq: int = 1):
        from ..inference.engine import Engine, ModelLoadError

        self.n_seq = n_seq
        if self.C is None:
            self.load_libraries()
        if self.manifest.base:  # an adapter-only bundle: the base's model, from its own file
            from ..bundlefile.base import find_base

            source, offset = find_base(self.payload, getattr(self.args, "base", None), self.cache, say=say)
            self.base_path = source
        elif self.manifest.model.parts:
            source, offset = self.payload.find_model_parts(), 0
        elif MODEL_ENTRY not in self.payload.entries:
            raise RuntimeFailure(f"{self.path} holds no model; rebuild it with bundle build")
        else:
            source, offset = self.source, self.payload.absolute_offset(MODEL_ENTRY)
            with open(self.source, "rb") as f:
                f.seek(offset)
                if f.read(4) != b"GGUF":
                    raise RuntimeFailure(f"{self.path}: the model inside it is damaged; copy the file again")
        from ..host.gpu import choice

        # every packed adapter, loaded; each applies at its scale (0: the base's computation exactly)
        adapters = [(self.source, self.payload.absolute_offset(lora_entry(name)), name) for name in self.adapter_scales]
        try:
            split = self.split["shares"] if self.split else None
            self.engine = choice.load(self.backend, self.settings, lambda gpu_layers, devices: Engine(
                self.C, source, offset, self.settings.ctx, self.threads(), gpu_layers, n_seq, devices,
                adapters=adapters, tensor_split=split if devices else None), say=say)
        except ModelLoadError as exc:
            # Name the damage if there is any: a hash check costs a read of the model, only on failure.
            problems = [p for p in self.payload.verify() if p.startswith((MODEL_ENTRY, "model part"))]
            if problems:
                raise RuntimeFailure(f"{self.path}: {problems[0]}; copy the file again") from None
            raise RuntimeFailure(f"{exc}; run with -v to see llama.cpp's log") from None
        self.engine.set_lora(self.adapter_scales.values())
        return self.engine

    def ram_cache_limit(self) -> int | None:
        """Bytes of computed prompts kept in memory (--cache-ram MiB): at most a quarter of the
        machine's memory unless -1 (no limit); 0 keeps none."""
        mib = self.settings.cache_ram
        if mib < 0:
            return None
        mem = hardware(1).get("memory_bytes") or 0
        return min(mib << 20, mem // 4) if mem else mib << 20

    def scheduler(self, engine, warm: bool = True):
        """The scheduler every mode decodes through, with the prompt cache in memory; and, when
        warm, the state after the system prompt put in a slot at once (read from the per-user
        cache when an earlier launch saved it there)."""
        from ..inference.promptcache import DISK_MIN, PromptCache, PromptStore
        from ..inference.scheduler import Scheduler

        limit = self.ram_cache_limit()
        sched = Scheduler(engine, cache=PromptCache(limit) if limit != 0 else None)
        self.warmup = None
        if warm:
            prefix = self.system_prefix()
            if len(prefix) >= DISK_MIN or (prefix and sched.cache is not None):
                store = None
                if self.settings.prompt_cache and len(prefix) >= DISK_MIN and self.cache is not None:
                    identity = {"bundle": self.payload.toc_sha256, "runtime": __version__, "ctx": engine.n_ctx,
                                "slots": engine.n_seq, "lora": list(sched.lora), "target": runtime_target()}
                    store = PromptStore(self.cache, os.fsdecode(self.path), identity)
                self.warmup = sched.warm(prefix, store)
                self.warmup.add_done_callback(self._say_warmup)
        return sched

    def prompt_cache_info(self) -> dict:
        """What the caches keep where (--info): the memory limit, and the states on disk."""
        from ..inference.promptcache import FOLDER, PromptStore

        limit = self.ram_cache_limit()
        disk = {"enabled": bool(self.settings.prompt_cache), "folder": None, "files": 0, "bytes": 0, "this_bundle": 0}
        if self.cache is not None:
            disk["folder"] = os.path.join(str(self.cache), FOLDER)
            own = PromptStore(self.cache, os.fsdecode(self.path), {}).owner + "-"
            try:
                for entry in os.scandir(disk["folder"]):
                    if entry.name.endswith(".kv"):
                        disk["files"] += 1
                        disk["bytes"] += entry.stat(follow_symlinks=False).st_size
                        disk["this_bundle"] += entry.name.startswith(own)
            except OSError:
                pass
        return {"ram_limit_bytes": -1 if limit is None else limit, "disk": disk}

    def _say_warmup(self, future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        w = future.result()
        if self.verbose and w["tokens"]:
            how = "read from the per-user cache" if w["restored"] else "decoded" + (", saved" if w["saved"] else "")
            say(f"system prompt: {w['tokens']} tokens {how} ({w['seconds']:.2f} s)")

    def system_prefix(self) -> list[int]:
        """The tokens every conversation of this launch begins with: the template's rendering of
        the system prompt (its own default when none is set) up to the first user turn. Found as
        the common start of two renderings with different user turns."""
        from ..inference.promptcache import common_prefix
        from ..prompts import reasoning

        e = self.engine
        try:
            tmpl = self.template()
            head = [{"role": "system", "content": self.settings.system}] if self.settings.system else []
            switch = reasoning.template_switch(tmpl.source, self.settings.think)
            a, b = (e.tokenize_prompt(tmpl.render(head + [{"role": "user", "content": text}], **switch))
                    for text in ("A", "7?"))
        except Exception:  # a template that cannot render: no prefix (the answer names the problem)
            return []
        return a[:common_prefix(a, b)]

    def template(self):
        e = self.engine
        name = self.manifest.template_name or self.settings.template or "auto"
        source = self.manifest.template or (e.chat_template() if e else None)
        return load_template(name, source, e.bos_text if e else "", e.eos_text if e else "")

    def sampling(self, stop):
        from ..inference.sampling import Sampling

        s = self.settings
        return Sampling(s.temp, s.top_p, s.top_k, s.repeat_penalty, s.seed, s.max_tokens, list(stop),
                        grammar=self.grammar(), **s.llama_sampling())

    def grammar(self) -> str | None:
        """The GBNF of -j/-jf's schema (the same conversion as the API's response_format), checked
        against the model's vocabulary once; None without a schema."""
        if not hasattr(self, "_grammar"):
            from ..prompts import structured

            schema = read_schema(self.args)
            self._grammar = None
            if schema is not None:
                try:
                    self._grammar = structured.schema_grammar(schema) if schema else structured.any_json_grammar()
                except structured.SchemaError as exc:
                    raise UsageError(f"-j: {exc}") from None
                if self.engine is not None and not self.engine.check_grammar(self._grammar):
                    raise UsageError("-j: the schema's grammar does not load in llama.cpp; simplify the schema")
        return self._grammar

    def template_label(self) -> str:
        """The chat format in words: the GGUF's own, a preset, a file."""
        name = self.manifest.template_name or self.settings.template or "auto"
        return "from the GGUF" if name == "auto" else printable(name)

    def banner(self) -> str:
        m = self.manifest.model
        e = self.engine
        parts = [
            printable(self.manifest.name or m.name or "model"),
            printable(" ".join(x for x in (m.size_label, m.quantization) if x)),
            self.backend.describe() if self.backend else f"CPU ({self.variant or 'unknown variant'})",
            f"{self.threads()} threads",
            self._across() if self.workers else "",
            f"ctx {e.n_ctx if e else self.settings.ctx}",
            f"{e.n_seq} slots" if e and e.n_seq > 1 else "",
            f"template {self.template_label()}",
        ]
        return " · ".join(p for p in parts if p)

    def _across(self) -> str:
        ws = self.workers.workers
        return (f"across {1 + len(ws)} machines: this one {self.split['local_layers']} layers, "
                + ", ".join(f"{printable(w.address)} {w.layers}" for w in ws))

    def server_info(self) -> dict:
        return {
            "name": self.manifest.name,
            "adapters": [{"id": i, "name": a.name, "scale": self.adapter_scales[a.name]}
                         for i, a in enumerate(self.manifest.adapters)],
            "model": self.manifest.model.to_json(),
            "backend": {**self.backend.to_json(), "threads": self.threads()},
            "rpc": self.rpc_info(),
            "created": int(time.time()),
        }

    def info(self) -> dict:
        from ..host import libraries
        from ..host.cpu import physical_cores

        if self.C is None:
            self.load_libraries()
        base = None
        if self.manifest.base:
            from ..bundlefile.base import find_base
            from ..errors import PayloadError

            base = {**self.manifest.base.to_json(), "found": None}
            try:
                base["found"] = find_base(self.payload, getattr(self.args, "base", None), self.cache, say=say)[0]
            except PayloadError as exc:
                base["problem"] = str(exc)
        return {
            "base": base,
            "bundle": os.fsdecode(self.path),
            "name": self.manifest.name,
            "format_version": self.payload.version,
            "runtime_version": __version__,
            "built": self.manifest.built,
            "model": self.manifest.model.to_json(),
            "template": self.manifest.template_name,
            "settings": self.settings.to_manifest(),
            "backend": {**self.backend.to_json(), "libraries": str(libraries.real_path(self.libdir))},
            "threads": self.threads(),
            "rpc": self.rpc_info(),
            "context": self.settings.ctx,
            "parallel": self.parallel(),
            "prompt_cache": self.prompt_cache_info(),
            "hardware": hardware(physical_cores()),
            "stub": self.manifest.stub.to_json(),
            "runs_on": self.targets,
            "adapters": [{**a.to_json(), "default_scale": a.scale, "scale": self.adapter_scales[a.name]}
                         for a in self.manifest.adapters],
            "cache_dir": str(self.cache),
            "unpacked_in": _unpacked_in(),
            "first_launch_check": self.check,
            "entries": {n: {"size": e.size, **digest.to_json(e.digest)} for n, e in self.payload.entries.items()},
        }


def _unpacked_in() -> dict | None:
    """Where the bootloader unpacked the Python runtime, and why there when it is not the
    usual temp folder (buildsys/bundle_unpack_dir.c)."""
    meipass = getattr(sys, "_MEIPASS", None)
    if not meipass:
        return None
    return {"folder": os.path.dirname(os.path.abspath(meipass)), "reason": getattr(sys, "_bundle_unpack_reason", None)}
