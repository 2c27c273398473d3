"""MkDocs hook: fills the generated reference pages from the code at build time (see dipsen.cli.reference)."""

CONFIG_TABLE = "<!-- generated: config table -->"


def on_page_markdown(markdown, page, config, files):  # noqa: ARG001 (MkDocs' hook signature)
    if CONFIG_TABLE in markdown:
        from dipsen.cli.reference import config_table

        markdown = markdown.replace(CONFIG_TABLE, config_table())
    return markdown
