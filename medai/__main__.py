from medai.cli import entry

entry()
