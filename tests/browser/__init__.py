"""End to end in a real browser: the published @jitsu/js p.js in headless Chromium, through the
proxy as a child process, to the fake Jitsu. Prerequisites: `bash tests/browser/install.sh`."""
