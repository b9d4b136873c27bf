"""Ollama: the Modelfile written beside a GGUF, and the command that adds the model to Ollama.

A GGUF answers gibberish in Ollama when its prompt format or stop tokens are lost, so the Modelfile
carries both: a Go template (Ollama's template language) that renders exactly the prompt the run
trained with, and a stop parameter for each string that ends an answer.

Text templates (guanaco, alpaca) are turns with fixed text around each message, which a Go template
writes directly. A model's own chat template is Jinja; it is translated only where it renders like
a format we know (ChatML, Llama 3, Phi-3), checked by rendering test conversations both ways.
Otherwise the Modelfile has no TEMPLATE and Ollama uses the chat template stored in the GGUF.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

from engine.templates import Template, TemplateError, TemplateSpec

CHATML = TemplateSpec(  # SmolLM2, Qwen2.5
    label="ChatML", system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
    generation_prompt="<|im_start|>assistant\n", stop_strings=("<|im_start|>", "<|im_end|>"))
LLAMA3 = TemplateSpec(
    label="Llama 3", system="<|start_header_id|>system<|end_header_id|>\n\n{content}<|eot_id|>",
    user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>",
    assistant="<|start_header_id|>assistant<|end_header_id|>\n\n{content}<|eot_id|>",
    generation_prompt="<|start_header_id|>assistant<|end_header_id|>\n\n",
    stop_strings=("<|eot_id|>", "<|start_header_id|>"))
PHI3 = TemplateSpec(
    label="Phi-3", system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n",
    assistant="<|assistant|>\n{content}<|end|>\n", generation_prompt="<|assistant|>\n",
    stop_strings=("<|end|>", "<|user|>"))
KNOWN_CHAT_FORMATS = (CHATML, LLAMA3, PHI3)
# Conversations a translation must render exactly like the Jinja template (first, with and
# without a system message, and after an earlier exchange)
PROBES = [
    [{"role": "user", "content": "Question one?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question one?"}],
    [{"role": "user", "content": "Question one?"}, {"role": "assistant", "content": "Answer one."},
     {"role": "user", "content": "Question two?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Question one?"},
     {"role": "assistant", "content": "Answer one."}, {"role": "user", "content": "Question two?"}],
]


@dataclass
class _Turns(Template):
    """A Template rendering a TemplateSpec that is not in the registry (a candidate format)."""

    turns: TemplateSpec | None = None

    @property
    def spec(self) -> TemplateSpec:
        return self.turns


def turn_format(template: Template) -> TemplateSpec | None:
    """The run's prompt format as fixed text around each message: a text template's own; for the
    model's own chat template, the known format it renders exactly like, its default system
    prompt as the preamble; None when it renders like none of them."""
    if not template.spec.chat_template:
        return template.spec
    for known in KNOWN_CHAT_FORMATS:
        fitted = _fit(known, template)
        if fitted is not None:
            return fitted
    return None


def _fit(known: TemplateSpec, template: Template) -> TemplateSpec | None:
    from engine.gguf_vocab import added_special_tokens

    tokenizer = template.chat_template_tokenizer
    bos = tokenizer.bos_token or ""
    adds_bos = added_special_tokens(tokenizer)[0]

    def jinja(messages: list[dict]) -> str:
        text = template.render(messages, add_generation_prompt=True)
        # Where the tokenizer adds BOS itself (llama.cpp will too), the template's BOS is not text
        return text[len(bos):] if adds_bos and bos and text.startswith(bos) else text

    try:
        first = jinja(PROBES[0])
        at = first.find(known.user.format(content=PROBES[0][0]["content"]))
        if at < 0:
            return None
        fitted = replace(known, preamble=first[:at])  # e.g. SmolLM2's default system prompt
        candidate = _Turns(template.name, template.eos, turns=fitted)
        if all(jinja(probe) == candidate.render(probe, add_generation_prompt=True)
               for probe in PROBES):
            return fitted
    except TemplateError:  # the template refuses a probe (Gemma: no system role)
        return None
    return None


def go_template(spec: TemplateSpec, eos: str) -> str:
    """An Ollama (Go) template writing the spec's turns around each message, then the generation
    prompt. Fixed text is written as quoted Go strings, so `{{-` never trims a newline of it."""
    lines = ["{{- range $i, $_ := .Messages }}"]
    if spec.preamble:  # written first, unless the conversation opens with a system message
        lines.append('{{- if and (eq $i 0) (ne .Role "system") }}' + _text(spec.preamble)
                     + "{{ end }}")
    for keyword, role in (("if", "system"), ("else if", "user"), ("else if", "assistant")):
        before, after = getattr(spec, role).replace("{eos}", eos).split("{content}")
        lines.append(f'{{{{- {keyword} eq .Role "{role}" }}}}{_text(before)}{{{{ .Content }}}}'
                     f"{_text(after)}")
    lines += ["{{- end }}", "{{- end }}" + _text(spec.generation_prompt)]
    return "\n".join(lines)


def _text(text: str) -> str:
    # A JSON string is a valid Go string literal (same escapes), and has no `"""` to end TEMPLATE
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def stop_strings(template: Template, spec: TemplateSpec | None) -> list[str]:
    """What ends an answer: the template's next-turn markers and the EOS the run learned."""
    stops = list(spec.stop_strings if spec is not None else ()) + [template.eos]
    return list(dict.fromkeys(stop for stop in stops if stop))


def modelfile_text(gguf_name: str, template: Template, system: str | None = None) -> str:
    """The Modelfile for the GGUF file gguf_name (in the same folder) of a run that trained with
    `template`; SYSTEM only when a system prompt is given."""
    spec = turn_format(template)
    lines = [f"# Ollama Modelfile for {gguf_name}. In this folder: "
             f"ollama create NAME -f Modelfile", f"FROM ./{gguf_name}", ""]
    if spec is not None:
        lines += [f"# The prompt format the model was fine-tuned with ({spec.label})",
                  f'TEMPLATE """{go_template(spec, template.eos)}"""']
    else:
        lines += ["# No TEMPLATE: this model's own chat template is not one we can write as an "
                  "Ollama template, so", "# Ollama takes it from the GGUF file "
                  "(tokenizer.chat_template), which holds the exact template it trained with."]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}"
              for stop in stop_strings(template, spec)]
    if system:
        if '"""' in system:
            raise ValueError('a system prompt for a Modelfile cannot contain """')
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def ollama_name(run_name: str) -> str:
    """A model name Ollama accepts (lower case letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^a-z0-9._-]+", "-", run_name.lower()).strip("-._") or "finetuned"


def ollama_command(name: str, modelfile: Path) -> str:
    return f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile))}"


def create_in_ollama(name: str, modelfile: Path, timeout_s: float = 1800) -> str | None:
    """Run `ollama create` where an ollama binary is on PATH; a sentence saying how it went, or
    None without one. A failure is a note, not an error: the files are complete either way."""
    binary = shutil.which("ollama")
    if binary is None:
        return None
    try:
        done = subprocess.run([binary, "create", name, "-f", modelfile.name], cwd=modelfile.parent,
                              capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"ollama create did not run ({exc}); run the command above yourself"
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()
        return (f"ollama create failed ({said[-1] if said else f'exit code {done.returncode}'}); "
                "is the Ollama server running? Then run the command above yourself")
    return f"Added to Ollama as {name}: chat with it with `ollama run {name}`"
