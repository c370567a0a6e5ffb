"""Output formatting shared by every verb: docker's durations, tables and ``--format`` templates.

As docker/cli's formatter package, one place renders what every command prints, so ``lamina images``
and ``lamina ps`` read the same way.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any

from lamina.errors import LaminaError

if TYPE_CHECKING:  # the template engine is imported only by a command given --format
    from lamina.gotemplate import GoMap, GoStruct, Template


def human_duration(seconds: float) -> str:
    """docker's units.HumanDuration: "Less than a second", "2 minutes", "About an hour", ..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = s // 60
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(s / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def go_human_size(size: float, precision: int) -> str:
    """docker's units.HumanSizeWithPrecision: decimal units, ``precision`` significant digits."""
    units = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
    index = 0
    while size >= 1000 and index < len(units) - 1:
        size /= 1000
        index += 1
    return f"{size:.{precision}g}{units[index]}"


def go_time(when: dt.datetime | None) -> str:
    """Go's time.Time.String in the local zone: ``2024-01-02 15:04:05 +0000 UTC``."""
    local = (when or dt.datetime.fromtimestamp(0, dt.UTC)).astimezone()
    return local.strftime("%Y-%m-%d %H:%M:%S %z ") + (local.tzname() or "")


def since(when: dt.datetime | None) -> str:
    if when is None:
        return "N/A"
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return human_duration((dt.datetime.now(dt.UTC) - when).total_seconds()) + " ago"


def print_table(rows: list[list[str]]) -> None:
    """Left-aligned columns separated by at least three spaces, like docker's tabwriter."""
    if not rows:
        return
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])] + [row[-1]]
        print("   ".join(cells).rstrip())


# --- --format: Go templates as docker's formatter package runs them ------------------------------
#
# docker/cli/cli/command/formatter: "table ..." renders a header row (the same template run on the
# column names) and the rows through a tab writer; "json" is {{json .}} per row; any other template
# runs once per row. Literal "\t" and "\n" in a format are a tab and a newline. All rows are
# rendered before anything is printed, so a template that fails prints nothing.

# docker's client exits 1 for a template error of a listing verb and 64 for an inspect template
# that does not parse (cli.StatusError), as the real docker CLI did in tests/test_format_cli.py.
TEMPLATE_EXIT = 1
INSPECT_PARSE_EXIT = 64


class TemplateError(LaminaError):
    """A ``--format`` template Go would refuse or fail to run: Go's message (as docker prints it),
    exit code ``TEMPLATE_EXIT`` unless given."""

    def __init__(self, message: str, exit_code: int = TEMPLATE_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def format_kind(fmt: str | None) -> str:
    """"default" (lamina's own table), "json", "table" (a table template) or "template"."""
    if not fmt or fmt == "table":
        return "default"
    if fmt == "json":
        return "json"
    return "table" if fmt.startswith("table") else "template"


def _template_text(fmt: str) -> str:
    """docker's Format.templateString."""
    if fmt == "json":
        return "{{json .}}"
    if fmt.startswith("table"):
        fmt = fmt[len("table"):]
    return fmt.strip(" ").replace("\\t", "\t").replace("\\n", "\n")


def parse_format(fmt: str, exit_code: int = TEMPLATE_EXIT) -> Template:
    """The template of ``--format fmt``, parsed before any output; TemplateError as docker's."""
    from lamina.gotemplate import Template
    from lamina.gotemplate import TemplateError as GoTemplateErrors

    try:
        return Template.parse(_template_text(fmt))
    except GoTemplateErrors as e:
        raise TemplateError(f"template parsing error: {e}", exit_code) from None


def precheck_format(fmt: str, empty_row: GoStruct) -> None:
    """docker ps's check before it lists anything: the format as given (a "table" prefix and
    literal \\t included) parsed and run once on an empty row."""
    from lamina.gotemplate import Template
    from lamina.gotemplate import TemplateError as GoTemplateErrors

    try:
        template = Template.parse(fmt)
    except GoTemplateErrors as e:
        raise TemplateError(f"failed to parse template: {e}") from None
    try:
        template.execute(empty_row)
    except GoTemplateErrors as e:
        raise TemplateError(f"failed to execute template: {e}") from None


def render_rows(fmt: str, rows: list[GoStruct], header: dict[str, str]) -> str:
    """What docker prints for ``--format fmt`` over ``rows`` (each a formatter context), header
    names by field for a table."""
    from lamina.gotemplate import HEADER_FUNCTIONS
    from lamina.gotemplate import TemplateError as GoTemplateErrors
    from lamina.gotemplate.tabwriter import tabwrite

    template = parse_format(fmt)
    lines: list[str] = []
    for row in rows:
        try:
            lines.append(template.execute(row) + "\n")
        except GoTemplateErrors as e:
            raise TemplateError(f"template parsing error: {e}") from None
    if format_kind(fmt) != "table":
        return "".join(lines)
    try:  # docker ignores an error of the header row, keeping what it wrote
        header_text = template.with_functions(HEADER_FUNCTIONS).execute(header_map(header))
    except GoTemplateErrors:
        header_text = ""
    return tabwrite(header_text + "\n" + "".join(lines))


def header_map(header: dict[str, str]) -> GoMap:
    """docker's SubHeaderContext: the column names, and a Label method naming a label's column."""
    from lamina.gotemplate import GoMap, GoMethod

    def label(name: str) -> str:
        return name.split(".")[-1].replace("-", " ").replace("_", " ")
    return GoMap(header, "formatter.SubHeaderContext", {"Label": GoMethod(label, 1)})


def context(type_name: str, fields: dict[str, Any]) -> GoStruct:
    """One row as docker's formatter context: its methods by name; ``{{json .}}`` encodes those
    that take no argument, sorted and HTML-escaped, as MarshalJSON does."""
    from lamina.gotemplate import GoMethod, GoStruct

    return GoStruct(type_name, fields,
                    json_fields=lambda: {k: v for k, v in fields.items() if not isinstance(v, GoMethod)})


def check_template(template: str) -> None:
    """TemplateError, before any output, for a ``--format`` that does not parse."""
    parse_format(template)


def render_template(template: str, obj: Any) -> str:
    """One object through ``template`` (docker's Format rules); TemplateError when Go fails."""
    from lamina.gotemplate import TemplateError as GoTemplateErrors

    try:
        return parse_format(template).execute(obj)
    except GoTemplateErrors as e:
        raise TemplateError(f"template parsing error: {e}") from None
