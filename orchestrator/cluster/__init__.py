"""What runs on the Ray cluster: a Tune trial per fold or sweep trial (each a Train run), the placement schedule and
the console. The only room of the project that imports Ray."""
