"""The read-only web view of a store (``adapters ui``; ``pip install 'adapterkit[ui]'``).

A rendering layer only: every fact comes from the library (``registry``, and
``gate.promote`` for alias history), every page is a Jinja2 template with autoescape,
and nothing here writes to the store. Modules:

* :mod:`cli.web.app`: assembles the Starlette app (templates, routes, static files);
* :mod:`cli.web.guard`: its guard (GET/HEAD only, allowed hosts, bearer token,
  security headers) and :class:`cli.web.guard.UiConfig`;
* :mod:`cli.web.errors`: library errors and bugs as error pages, never tracebacks;
* :mod:`cli.web.routes`: the route table (HTML pages and ``/api/``);
* :mod:`cli.web.pages`: each page's data; :mod:`cli.web.documents`: the CLI's
  ``--json`` documents; :mod:`cli.web.graph`: the lineage graph's layout;
* ``templates/`` and ``static/`` (one small stylesheet; no JavaScript, no CDN).

It must not import torch, transformers or peft (checked by the route tests).
"""
