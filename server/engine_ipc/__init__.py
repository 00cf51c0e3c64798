"""One engine process per device, N front ends (docs/datacenter.md#processes).

    wire.py      the fixed binary frames both sides speak over a Unix domain socket
    engine.py    the engine process: models, batchers, decode loops; arrays and ids only
    client.py    a front end's connection to the engine: calls in, results out, reconnects
    remote.py    RemoteRepository and the remote models the fronts' services call, in place
                 of the local ModelRepository and ClassifierModel / GeneratorModel
    split.py     `engine_tasks`: the engine serves some tasks, each front end loads the rest
    supervisor.py  `headrace serve --workers N --engine-process`: starts, restarts, drains
"""
