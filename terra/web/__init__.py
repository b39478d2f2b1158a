"""The viewers' pages: static HTML, CSS and JavaScript (no build step, no CDN)."""
