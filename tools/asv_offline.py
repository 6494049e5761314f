"""Make an ``asv publish`` dashboard work without internet access.

asv's HTML loads jQuery, flot, bootstrap and three small plugins from public
CDNs, so on a machine with no internet (CI here, an air-gapped cluster) the
page falls back to "external dependencies failed to load". This script
fetches the same libraries from the npm registry (``npm pack``; cached in
``~/.cache/fastopt/asv-js``), copies them into ``<html_dir>/vendor/`` and
points the published pages at the local copies.

    asv publish && python tools/asv_offline.py .asv/html

Only the files named below are touched; an unknown CDN URL is an error, so a
new asv version that adds a dependency is noticed instead of half-working.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tarfile

# CDN URL in asv 0.6's index.html -> (npm package@version, file in the package).
# stupidtable 1.0.1 is not on npm; 1.1.3 has the same $.fn.stupidtable API.
CDN_FILES = {
    "https://code.jquery.com/jquery-3.3.1.min.js":
        ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js":
        ("flot@0.8.3", "jquery.flot.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.time.min.js":
        ("flot@0.8.3", "jquery.flot.time.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.selection.min.js":
        ("flot@0.8.3", "jquery.flot.selection.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.categories.min.js":
        ("flot@0.8.3", "jquery.flot.categories.js"),
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js":
        ("flot-orderbars@1.0.0", "js/jquery.flot.orderBars.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js":
        ("stupid-table-plugin@1.1.3", "stupidtable.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js":
        ("blueimp-md5@2.19.0", "js/md5.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js":
        ("bootstrap@3.1.1", "dist/js/bootstrap.min.js"),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css":
        ("bootstrap@3.1.1", "dist/css/bootstrap.min.css"),
}
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "fastopt", "asv-js")
URL = re.compile(r'(src|href)="(https?://[^"]+)"')


def _package(spec):
    """Path of the npm tarball for ``spec``, downloaded once."""
    name, version = spec.rsplit("@", 1)
    tgz = os.path.join(CACHE, f"{name}-{version}.tgz")
    if not os.path.exists(tgz):
        if shutil.which("npm") is None:
            raise SystemExit("asv_offline: npm is needed to fetch the dashboard's "
                             "JavaScript (apt-get install npm)")
        os.makedirs(CACHE, exist_ok=True)
        subprocess.run(["npm", "pack", "--silent", spec], cwd=CACHE, check=True,
                       stdout=subprocess.DEVNULL)
    return tgz


def vendor(html_dir):
    """Copy the libraries into html_dir/vendor and rewrite the pages."""
    pages = glob.glob(os.path.join(html_dir, "*.html"))
    if not pages:
        raise SystemExit(f"asv_offline: no .html files in {html_dir!r}: run asv publish first")
    local = {}
    for url, (spec, member) in CDN_FILES.items():
        target = os.path.join("vendor", spec.split("@")[0], os.path.basename(member))
        with tarfile.open(_package(spec)) as tar:
            data = tar.extractfile(f"package/{member}").read()
        os.makedirs(os.path.join(html_dir, os.path.dirname(target)), exist_ok=True)
        with open(os.path.join(html_dir, target), "wb") as f:
            f.write(data)
        local[url] = target
    for page in pages:
        with open(page) as f:
            text = f.read()
        # links to asv's and the project's home pages are fine; scripts and
        # stylesheets from anywhere else would break offline
        unknown = sorted(u for _, u in URL.findall(text)
                         if u not in local and not u.startswith("https://github.com/"))
        if unknown:
            raise SystemExit(f"asv_offline: {os.path.basename(page)} loads {unknown}, "
                             "which this script does not know: add them to CDN_FILES")
        for url, path in local.items():
            # the local copy is not byte-identical to the CDN's (npm ships the
            # unminified flot), so the subresource-integrity hash must go
            text = re.sub(r'(src|href)="' + re.escape(url) + r'"((?:\s+(?:integrity|'
                          r'crossorigin|referrerpolicy)="[^"]*")*)',
                          lambda m: f'{m.group(1)}="{path}"', text)
        with open(page, "w") as f:
            f.write(text)
    return sorted(local.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("html_dir", nargs="?", default=".asv/html")
    args = parser.parse_args(argv)
    files = vendor(args.html_dir)
    print(f"{args.html_dir}: {len(files)} libraries now served from vendor/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
