"""``python -m prompt_tool``: the ``prompt-tool`` command."""

from prompt_tool.cli.prompt_tool import main

if __name__ == "__main__":
    main()
