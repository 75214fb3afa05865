"""`python -m server` is `loraplex serve`."""
from clients.cli import main

if __name__ == "__main__":
    main(["serve", *__import__("sys").argv[1:]])
