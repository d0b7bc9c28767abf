"""Django-free ML code: nothing here imports Django or the apps."""
