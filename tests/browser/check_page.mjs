// Opens an HTML file in headless Chromium (npm's @sparticuz/chromium, driven by puppeteer-core),
// takes a screenshot, and prints what a test checks, as JSON: console errors, the ids of the
// page's svg elements and their rect counts, and the screenshot's pixels as the browser decodes
// them (share of non-white pixels, number of distinct colours). Usage: node check_page.mjs FILE PNG
import chromium from "@sparticuz/chromium";
import puppeteer from "puppeteer-core";
import { writeFileSync } from "node:fs";
import { pathToFileURL } from "node:url";

const [file, png] = process.argv.slice(2);
const browser = await puppeteer.launch({
  args: [...chromium.args, "--no-sandbox"], executablePath: await chromium.executablePath(), headless: true,
});
try {
  const page = await browser.newPage();
  await page.setViewport({ width: 1400, height: 1000 });
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  page.on("pageerror", (e) => errors.push(String(e)));
  page.on("requestfailed", (r) => errors.push(`request failed: ${r.url()}`));
  const requests = [];
  page.on("request", (r) => { if (!/^(file|data):/.test(r.url())) requests.push(r.url()); });  // the network
  await page.goto(pathToFileURL(file).href, { waitUntil: "load" });
  const svgs = await page.$$eval("svg", (all) => all.map((s) => ({ id: s.id, rects: s.querySelectorAll("rect").length })));
  const shot = await page.screenshot({ encoding: "base64", fullPage: true });
  writeFileSync(png, Buffer.from(shot, "base64"));
  const pixels = await page.evaluate(async (b64) => {
    const img = new Image();
    img.src = "data:image/png;base64," + b64;
    await img.decode();
    const canvas = document.createElement("canvas");
    canvas.width = img.width; canvas.height = img.height;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(img, 0, 0);
    const data = ctx.getImageData(0, 0, img.width, img.height).data;
    const colours = new Set();
    let nonWhite = 0;
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] < 245 || data[i + 1] < 245 || data[i + 2] < 245) nonWhite++;
      if (i % 64 === 0) colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
    }
    return { width: img.width, height: img.height, nonWhite: nonWhite / (data.length / 4), colours: colours.size };
  }, shot);
  console.log(JSON.stringify({ errors, requests, svgs, pixels, title: await page.title() }));
} finally {
  await browser.close();
}
