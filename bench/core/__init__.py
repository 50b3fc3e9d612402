"""The shared layer every benchmark may import, and that imports none of them: the results
store (``results``, ``rows``), launching fresh worker processes (``launchers``,
``protocol``, ``children``, ``layout``), measuring (``measure``, ``environment``,
``checks``), layer shapes of models (``shapes``, ``catalog``), cost laws (``costlaw``),
statistics (``intervals``, ``paired``), configuration as data (``options``,
``defaults``) and what ``loram_ref``'s source registers (``sources``)."""
