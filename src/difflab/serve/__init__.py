"""``difflab serve``: a local web page over the same Python functions as the command line.

- :mod:`.jobs`: the queue (one worker thread, one sampling at a time, cancel at the next step);
- :mod:`.studio`: the loaded run(s) and ``--out``; a page's request becomes the command line that
  reproduces it, parsed by difflab's parser and run by the CLI's own functions;
- :mod:`.app`: the Starlette app (the ``ui`` extra) and its one hand-written page, ``page.html``,
  which loads nothing from anywhere but this server.
"""
