"""Reference pages generated from the code: reference/api.rst and ``mpitrain-options``.

reference/api.rst (written at each build) documents every public name of ``mpitrain`` (its lazy ``_API``
table, grouped by subpackage) and of ``mpitrain.torch`` through autodoc;
``mpitrain-options`` writes the table of ``Config``'s fields: flag, type, default,
help, the choices and the options that decide whether it applies (``config.rules``).
"""
import dataclasses
import inspect

from docutils import nodes
from sphinx.util.docutils import SphinxDirective

GROUPS = [("process", "The process"), ("runtime", "Errors and the job"),
          ("config", "Options"), ("model", "Models"), ("data", "Data"),
          ("comm", "The exchange and the rank grid"), ("parallel", "Trainers"),
          ("run", "Training and prediction"), ("fault", "Checkpoints and failures")]
TORCH = ["fit", "DistributedOptimizer", "broadcast_parameters", "broadcast_optimizer_state",
         "TorchDataset", "TorchTrainer", "load_state"]


def _directive(module: str, name: str, obj) -> list:
    kind = "autoclass" if inspect.isclass(obj) else "autofunction"
    lines = [f".. {kind}:: {module}.{name}"]
    if kind == "autoclass":
        lines += ["   :members:", "   :show-inheritance:"]
    return lines + [""]


def api_rst() -> str:
    """The API reference as reStructuredText: one autodoc entry per public object."""
    import mpitrain
    import mpitrain.torch as mt

    lines = ["Python API", "==========", "",
             "Every public object of ``mpitrain`` (loaded on first use: ``import mpitrain`` "
             "stays light) and of ``mpitrain.torch``, from their docstrings. The options that "
             "``fit``, the trainers and the command line take are ``Config``'s fields "
             "(:doc:`config`).", ""]
    for prefix, title in GROUPS:
        names = [n for n, where in mpitrain._API.items()
                 if (where if isinstance(where, str) else where[0]).split(".")[0] == prefix]
        if names:
            lines += [title, "-" * len(title), ""]
            for name in names:
                lines += _directive("mpitrain", name, getattr(mpitrain, name))
    lines += ["PyTorch models: mpitrain.torch", "-" * 30, "",
              ".. automodule:: mpitrain.torch", "   :no-members:", ""]
    for name in TORCH:
        lines += _directive("mpitrain.torch", name, getattr(mt, name))
    return "\n".join(lines)


def write_api(app) -> None:
    """Write reference/api.rst (generated, not kept in git) before the sources are read."""
    import os

    path = os.path.join(app.srcdir, "reference", "api.rst")
    text = api_rst()
    old = open(path).read() if os.path.exists(path) else None
    if text != old:
        with open(path, "w") as f:
            f.write(text)


class OptionsDirective(SphinxDirective):
    """The table of ``Config``'s fields."""

    def run(self):
        from mpitrain.config import CHOICES, Config, flag
        from mpitrain.config.rules import TORCH_GIVES, option_rules

        deciding = {}
        for name, _, _, others in option_rules(Config()):
            deciding.setdefault(name, set()).update(o for o in others if o != name)
        for name in TORCH_GIVES:
            deciding.setdefault(name, set()).add("torch")
        table = nodes.table()
        group = nodes.tgroup(cols=4)
        table += group
        for width in (22, 14, 12, 52):
            group += nodes.colspec(colwidth=width)
        head = nodes.thead()
        group += head
        head += self._row(["option", "type", "default", "what it does"])
        body = nodes.tbody()
        group += body
        for f in dataclasses.fields(Config):
            default = f.default
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            text = f.metadata.get("help", "")
            if f.name in CHOICES:
                text += ". Choices: " + ", ".join(CHOICES[f.name])
            if deciding.get(f.name):
                text += ". Applies depending on: " + ", ".join(
                    flag(o) for o in sorted(deciding[f.name]))
            body += self._row([f"{flag(f.name)} ({f.name})", str(f.type),
                               "" if default is None else str(default), text])
        return [table]

    @staticmethod
    def _row(cells):
        row = nodes.row()
        for cell in cells:
            entry = nodes.entry()
            entry += nodes.paragraph(text=cell)
            row += entry
        return row


def _escape(text: str) -> str:
    """``*`` outside double-backquoted literals, as text: the docstrings write shapes
    such as (n, *features) and keyword splats, not reStructuredText emphasis."""
    parts = text.split("``")
    for k in range(0, len(parts), 2):  # the even parts are outside literals
        parts[k] = parts[k].replace("*", "\\*")
    return "``".join(parts)


def escape_docstring(app, what, name, obj, options, lines) -> None:
    """autodoc-process-docstring: every line through ``_escape``."""
    lines[:] = [_escape(line) for line in lines]


def setup(app):
    app.connect("autodoc-process-docstring", escape_docstring)
    app.connect("builder-inited", write_api)
    app.add_directive("mpitrain-options", OptionsDirective)
    return {"parallel_read_safe": True, "version": "1"}
