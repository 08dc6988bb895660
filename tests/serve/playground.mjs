// The playground page of `modpo-trainer serve` in a real browser: headless Chromium (Debian's
// /usr/bin/chromium) driven by Playwright. Moves a slider with the keyboard (the others follow
// so the weights stay on the simplex), sends the prompt, and checks the streamed answer is the
// API's greedy answer at the weights the page shows; then the same side by side at two weights.
//
// Usage: node playground.mjs BASE_URL [SCREENSHOT.png]
// (PROMPT and MAX_TOKENS in the environment replace the test's prompt and answer length.)

import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";

const [base, screenshot] = process.argv.slice(2);
const profile = mkdtempSync(join(tmpdir(), "modpo-chromium-"));

function check(condition, message) {
  if (!condition) throw new Error(message);
}

// The API's greedy answer at `w`, as the page asks for it.
async function apiAnswer(model, prompt, maxTokens, w) {
  const response = await fetch(`${base}/v1/chat/completions`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({
      model, messages: [{ role: "user", content: prompt }], max_tokens: maxTokens,
      temperature: 0, preference_weights: w,
    }),
  });
  check(response.ok, `API answered ${response.status}`);
  return (await response.json()).choices[0].message.content;
}

// The weights the sliders of `panel` show, as numbers.
async function shownWeights(page, panel) {
  return page.$$eval(`#weights-${panel} input[type=range]`, (inputs) => inputs.map((i) => parseFloat(i.value)));
}

const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  viewport: { width: 1200, height: 800 },
});
try {
  const page = context.pages()[0] || (await context.newPage());
  const pageErrors = [];
  page.on("pageerror", (e) => pageErrors.push(String(e)));
  await page.goto(base);
  await page.waitForSelector("body[data-ready=true]", { timeout: 30000 });
  const model = (await (await fetch(`${base}/v1/models`)).json()).data[0];
  const sliders = page.locator("#weights-a input[type=range]");
  check((await sliders.count()) === model.preference_dimensions.length, "one slider per dimension");

  // Move the first slider right by ten steps of 0.01: the others make room.
  const before = await shownWeights(page, "a");
  await sliders.first().focus();
  for (let i = 0; i < 10; i++) await page.keyboard.press("ArrowRight");
  const after = await shownWeights(page, "a");
  check(Math.abs(after[0] - before[0] - 0.1) < 1e-6, `slider moved ${before} -> ${after}`);
  const sum = after.reduce((s, x) => s + x, 0);
  check(Math.abs(sum - 1) < 1e-6, `weights ${after} sum to ${sum}, not 1`);

  const prompt = process.env.PROMPT || "Give me one tip.";
  const maxTokens = parseInt(process.env.MAX_TOKENS || "24", 10);
  await page.fill("#prompt", prompt);
  await page.fill("#max-tokens", String(maxTokens));
  await page.click("#send");
  await page.waitForSelector("#status-a[data-done=true]", { timeout: 600000 });
  const answer = await page.textContent("#answer-a");
  const expected = await apiAnswer(model.id, prompt, maxTokens, after);
  check(answer.length > 0, "no answer appeared");
  check(answer === expected, `page answer ${JSON.stringify(answer)} != API ${JSON.stringify(expected)}`);
  console.log(`ok answer streamed at w = ${after}`);

  // Side by side: panel B starts at the last dimension alone.
  await page.check("#compare");
  check(await page.isVisible("#column-b"), "the second column is shown");
  await page.click("#send");
  await page.waitForSelector("#status-a[data-done=true]", { timeout: 600000 });
  await page.waitForSelector("#status-b[data-done=true]", { timeout: 600000 });
  const wB = await shownWeights(page, "b");
  const [a, b] = [await page.textContent("#answer-a"), await page.textContent("#answer-b")];
  check(a === expected, "side by side: answer A changed");
  const expectedB = await apiAnswer(model.id, prompt, maxTokens, wB);
  check(b === expectedB, `side by side: answer B ${JSON.stringify(b)} != API ${JSON.stringify(expectedB)}`);
  check(a !== b, "the two weightings gave the same answer: the side-by-side check shows nothing");
  console.log(`ok side by side at w = ${after} and ${wB}`);
  check(pageErrors.length === 0, `errors on the page: ${pageErrors}`);
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
